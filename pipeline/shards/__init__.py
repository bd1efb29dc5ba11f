"""The heavy stages cut into shards for pipeline.executor: each module holds one stage's shard function
(a pure function of the stage's inputs and the shard's spec) and the merge of the shards' results into
the stage's outputs, in a fixed order, so any number of shards writes the same bytes as one."""
