"""What a shard is to the supervisor, without the loop: its spec (from the shard map), its states,
its restart policy and its process."""
