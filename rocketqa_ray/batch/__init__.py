"""Ray Data: resumable sharded batch jobs - corpus encoding and cross-encoder pair scoring."""
