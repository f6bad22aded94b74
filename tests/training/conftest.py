TINY = [
    "steps=12",
    "eval_every=6",
    "eval_batches=2",
    "log_every=1",
    "data.seq_len=32",
    "data.batch_size=4",
    "model.d_model=32",
    "model.n_layers=2",
    "model.ffn_hidden=64",
    "model.max_seq_len=64",
    "optim.warmup_steps=2",
]
TINY_MOE = [
    *TINY,
    "model.moe.num_experts=4",
    "model.moe.expert_hidden=32",
    "model.moe.top_k=2",
]
