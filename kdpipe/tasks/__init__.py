"""Tasks as plug-ins: what differs between a classifier, a translator and a sentence encoder (kdpipe.tasks.*)."""
