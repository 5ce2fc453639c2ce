"""The write path behind the recorder: the store buffers record lines per topic, the topic
files do the system calls (segments, rotation, retention, +recent.json), new topics are
prepared and rotated segments compressed in the background; with a journal, the journal and
its materializer sit between the recorder and the store."""
