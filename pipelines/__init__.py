"""pipelines: the stages (ingest, tokenizer, shard, pretrain, evaluate, export) and the DAG that joins them."""
