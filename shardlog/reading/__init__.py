"""Reading what was recorded: the history API (re-exported by :mod:`shardlog.history`), SQL
and Parquet over a root (DuckDB), SQLite export, and the NGINX front for multi-host roots."""
