"""The bad command lines of the CLI robustness corpus.

Each row: the command line (shell syntax, run inside the workspace of `workspace.py`, whose folders
it names) and a piece of text the one-line error must hold (the field, flag or file at fault). Every
row must end with exit status 2, exactly one line on stderr, no traceback and no file changed.
"""

from __future__ import annotations

# (command line, the error names this)
TRAIN = [
    # wrong types, optional fields included
    ("train --model.head_dim=abc", "head_dim"),
    ("train --model.num_key_value_heads=[2]", "num_key_value_heads"),
    ("train --model.rope_scaling=5", "rope_scaling"),
    ("train --model.q_lora_rank=true", "q_lora_rank"),
    ("train --model.swiglu_limit=abc", "swiglu_limit"),
    ("train --model.bos_token_id=1.5", "bos_token_id"),
    ("""train '--model.hidden_size="64"'""", "hidden_size"),
    ("train --model.hidden_size=64.5", "hidden_size"),
    ("train --model.hidden_size=true", "hidden_size"),
    ("train --model.tie_word_embeddings=2", "tie_word_embeddings"),
    ("train --model.kernels=maybe", "kernels"),
    ("train --model.sparse_layers=5", "sparse_layers"),
    ("train --model.sparse_layers=[]", "sparse_layers"),
    ("""train '--model.sparse_layers=["dense",3]'""", "sparse_layers"),
    ("""train '--model.rope_scaling={"rope_type":"yarn","factor":"x"}'""", "factor"),
    ("""train '--model.rope_scaling={"rope_type":"yarn","factor":0.5}'""", "factor"),
    ("""train '--model.rope_scaling={"rope_type":"magic"}'""", "rope_type"),
    ("""train '--model.rope_scaling={"rope_type":"yarn","factor":NaN}'""", "factor"),
    ("""train '--model.rope_scaling={"rope_type":["yarn"]}'""", "rope_type"),
    ("train --train.compile=yes", "compile"),
    ("train --log.progress=2", "progress"),
    ("train --data.path=5", "data.path"),
    ("train --data.cache_dir=5", "cache_dir"),
    ("train --schedule.milestones=0.5", "milestones"),
    ("""train '--schedule.milestones=[0.5,"x"]'""", "milestones"),
    ("train --optim=5", "optim"),
    # numbers out of range, NaN, infinities
    ("train --optim.beta1=2", "optim.beta1"),
    ("train --optim.beta1=-0.1", "optim.beta1"),
    ("train --optim.beta2=1", "optim.beta2"),
    ("train --optim.eps=-1", "optim.eps"),
    ("train --optim.eps=0", "optim.eps"),
    ("train --optim.lr=NaN", "optim.lr"),
    ("train --optim.lr=Infinity", "optim.lr"),
    ("train --optim.lr=-Infinity", "optim.lr"),
    ("train --optim.lr=1e400", "optim.lr"),
    ("train --optim.lr=-1", "optim.lr"),
    ("train --optim.weight_decay=-0.1", "weight_decay"),
    ("train --optim.weight_decay=NaN", "weight_decay"),
    ("train --optim.grad_clip=NaN", "grad_clip"),
    ("train --optim.grad_clip=-1", "grad_clip"),
    ("train --optim.muon_lr=Infinity", "muon_lr"),
    ("train --optim.muon_momentum=1.5", "muon_momentum"),
    ("train --optim.name=sgd", "optim.name"),
    ("train --model.initializer_range=-1", "initializer_range"),
    ("train --model.initializer_range=NaN", "initializer_range"),
    ("train --model.rms_norm_eps=NaN", "rms_norm_eps"),
    ("train --model.rms_norm_eps=0", "rms_norm_eps"),
    ("train --model.rms_norm_eps=Infinity", "rms_norm_eps"),
    ("train --model.attention_dropout=1.5", "attention_dropout"),
    ("train --model.hidden_dropout=NaN", "hidden_dropout"),
    ("train --model.rope_theta=0", "rope_theta"),
    ("train --model.rope_theta=-5", "rope_theta"),
    ("train --model.rope_theta=NaN", "rope_theta"),
    ("train --model.routed_scaling_factor=NaN", "routed_scaling_factor"),
    ("train --model.mtp_loss_weight=-1", "mtp_loss_weight"),
    ("train --model.aux_loss_alpha=NaN", "aux_loss_alpha"),
    ("train --model.bias_update_speed=-1", "bias_update_speed"),
    ("train --model.hc_eps=-1", "hc_eps"),
    ("train --model.hc_mult=0", "hc_mult"),
    ("train --model.num_nextn_predict_layers=-1", "num_nextn_predict_layers"),
    ("train --model.sliding_window=0", "sliding_window"),
    ("train --model.bos_token_id=-1", "bos_token_id"),
    ("train --model.pad_token_id=-5", "pad_token_id"),
    ("train --model.hidden_size=0", "hidden_size"),
    ("train --model.hidden_size=-64", "hidden_size"),
    ("train --preset gpt2-tiny --model.num_attention_heads=5", "num_attention_heads"),
    ("train --model.position=rotary", "position"),
    ("train --model.attention=flash", "attention"),
    ("train --model.ffn=moe --model.n_routed_experts=0", "n_routed_experts"),
    ("train --schedule.name=linear", "schedule.name"),
    ("train --schedule.warmup_steps=-1", "warmup_steps"),
    ("train --schedule.min_lr_ratio=2", "min_lr_ratio"),
    ("train --schedule.decay_fraction=-0.1", "decay_fraction"),
    ("train --schedule.gamma=NaN", "gamma"),
    ("train --schedule.milestones=[1.5]", "milestones"),
    ("train --train.threads=-1", "train.threads"),
    ("train --train.seed=1e23", "train.seed"),
    ("train --train.seed=-1", "train.seed"),
    ("train --train.batch_size=0", "batch_size"),
    ("train --train.grad_accum=0", "grad_accum"),
    ("train --train.max_steps=-5", "max_steps"),
    ("train --train.max_tokens=-5", "max_tokens"),
    ("train --train.max_seconds=NaN", "max_seconds"),
    ("train --train.max_seconds=-1", "max_seconds"),
    ("train --train.dtype=float16", "dtype"),
    ("train --train.device=tpu", "device"),
    ("train --train.dsa_warmup_steps=-1", "dsa_warmup_steps"),
    ("train --checkpoint.every=-1", "checkpoint.every"),
    ("train --checkpoint.keep_last=0", "keep_last"),
    ("train --log.every=0", "log.every"),
    ("train --eval.every=-1", "eval.every"),
    ("train --eval.batches=0", "eval.batches"),
    ("train --eval.batches=-3", "eval.batches"),
    ("train --eval.batch_size=0", "eval.batch_size"),
    ("train --dist.strategy=horovod", "strategy"),
    ("train --data.val_fraction=1", "val_fraction"),
    ("train --data.val_fraction=NaN", "val_fraction"),
    ("train --data.seq_len=0", "seq_len"),
    ("train --data.seq_len=100000", "seq_len"),
    ("train --data.tokenizer=bpe --data.vocab_size=10", "vocab_size"),
    ("train --data.tokenizer=nosuch.json", "nosuch.json"),
    ("train --data.tokenizer=files", "files"),
    ("""train '--data.path=["nosuch.txt"]'""", "nosuch.txt"),
    ("train --data nosuch.txt", "nosuch.txt"),
    ("train --data files", "files"),
    # sizes that do not fit
    ("train --model.hidden_size=1000000000", "hidden_size"),
    ("train --model.vocab_size=100000000000", "vocab_size"),
    ("train --model.max_position_embeddings=200000000", "max_position_embeddings"),
    ("train --model.num_hidden_layers=10000000", "num_hidden_layers"),
    ("train --model.intermediate_size=100000000000", "intermediate_size"),
    ("train --train.batch_size=1000000000000", "batch_size"),
    # files, folders and the command line itself
    ("train nosuch.toml", "nosuch.toml"),
    ("train files", "is a folder"),
    ("train files/nonutf8.toml", "nonutf8.toml"),
    ("train files/list.json", "list.json"),
    ("train files/bad.toml", "bad.toml"),
    ("train files/unknown.toml", "learning_rate"),
    ("train files/section_int.json", "optim"),
    ("train files/deep.json", "deep.json"),
    ("train files/nan.json", "optim.lr"),
    ("train files/preset_int.toml", "preset"),
    ("train --preset nosuch", "nosuch"),
    ("train --out /proc/x", "/proc/x"),
    ("train --out file.txt/run", "file.txt"),
    ("train --out file.txt", "file.txt"),
    ("train --max-steps abc", "--max-steps"),
    ("train --max-steps -1", "--max-steps"),
    ("train --nproc abc", "--nproc"),
    ("train --nproc -2", "--nproc"),
    ("train --bogus", "--bogus"),
    ("train --model.hidden_size", "model.hidden_size"),
    ("train --model..x=1", "model..x"),
    ("train a.toml b.toml", "b.toml"),
]

ABLATE = [
    ("ablate", "--variant"),
    ("ablate --variant nosuch", "nosuch"),
    ("ablate --variant model.hidden_size=0", "hidden_size"),
    ("ablate --variant gpt2-tiny --optim.beta1=2", "optim.beta1"),
    ("ablate --variant a:model.fusion=dwa --variant a:model.fusion=mhc", "repeat"),
    ("ablate --variant gpt2-tiny --out /proc/x", "/proc/x"),
    ("ablate --variant gpt2-tiny --out file.txt", "file.txt"),
]

SAMPLE = [
    ("sample ckpt --threads -2", "--threads"),
    ("sample ckpt --temperature nan", "--temperature"),
    ("sample ckpt --temperature inf", "--temperature"),
    ("sample ckpt --temperature -1", "--temperature"),
    ("sample ckpt --max-new-tokens -5", "--max-new-tokens"),
    ("sample ckpt --max-new-tokens 0", "--max-new-tokens"),
    ("sample ckpt --max-new-tokens abc", "--max-new-tokens"),
    ("sample ckpt --source hi", "--source"),
    ("sample ckpt --seed 1e23", "--seed"),
    ("sample ckpt --seed 100000000000000000000000", "--seed"),
    ("sample ckpt --seed -1", "--seed"),
    ("sample ckpt --top-k 0", "--top-k"),
    ("sample ckpt --top-k -3", "--top-k"),
    ("sample ckpt --top-p 0", "--top-p"),
    ("sample ckpt --top-p 1.5", "--top-p"),
    ("sample ckpt --top-p nan", "--top-p"),
    ("sample ckpt --repetition-penalty 0", "--repetition-penalty"),
    ("sample ckpt --repetition-penalty nan", "--repetition-penalty"),
    ("sample ckpt --prompt ''", "prompt"),
    ("sample ckpt --device tpu", "--device"),
    ("sample ckpt --speculative --compile", "--speculative"),
    ("sample ckpt --bogus", "--bogus"),
    ("sample", "ckpt"),
    ("sample nosuch", "nosuch"),
    ("sample files", "files"),
    ("sample file.txt", "file.txt"),
    # broken checkpoints
    ("sample hf_hidden_str", "hidden_size"),
    ("sample hf_maxpos", "max_position_embeddings"),
    ("sample hf_layers", "num_hidden_layers"),
    ("sample hf_vocab", "vocab_size"),
    ("sample hf_rope5", "rope_scaling"),
    ("sample hf_eps_nan", "rms_norm_eps"),
    ("sample hf_heads_list", "num_attention_heads"),
    ("sample hf_no_vocab", "vocab_size"),
    ("sample hf_cfg_list", "config.json"),
    ("sample hf_cfg_bytes", "config.json"),
    ("sample hf_cfg_deep", "config.json"),
    ("sample hf_model_type_list", "model_type"),
    ("sample idx_map5", "weight_map"),
    ("sample idx_list", "index"),
    ("sample idx_values_int", "weight_map"),
    ("sample idx_passwd", "/etc/passwd"),
    ("sample idx_dotdot", "outside"),
    ("sample idx_folder", "weight_map"),
    ("sample st_dtype_list", "dtype"),
    ("sample st_deep", "model.safetensors"),
    ("sample st_i32", "int32"),
    ("sample st_overlap", "overlap"),
    ("sample st_range", "model.safetensors"),
    ("sample st_neg_shape", "shape"),
    ("sample st_shape_nested", "shape"),
    ("sample st_not_json", "model.safetensors"),
    ("sample st_header_len", "model.safetensors"),
    ("sample st_truncated", "model.safetensors"),
    ("sample st_empty", "model.safetensors"),
    ("sample st_folder", "is a folder"),
    ("sample native_cfg_list", "config.json"),
    ("sample native_fields_list", "config.json"),
    ("sample native_hidden_str", "hidden_size"),
    ("sample native_maxpos", "max_position_embeddings"),
    ("sample native_eps_neg", "rms_norm_eps"),
    ("sample native_no_weights", "model.safetensors"),
    ("sample native_cfg_folder", "config.json"),
    ("sample tok_list", "tokenizer.json"),
    ("sample tok_bytes", "tokenizer.json"),
    ("sample tok_chars_int", "tokenizer.json"),
    ("sample tok_folder", "tokenizer.json"),
    ("sample tok_missing", "tokenizer.json"),
]

CHAT = [
    ("chat ckpt --temperature nan", "--temperature"),
    ("chat ckpt --max-new-tokens -1", "--max-new-tokens"),
    ("chat ckpt --top-p 2", "--top-p"),
    ("chat ckpt --top-k 0", "--top-k"),
    ("chat ckpt --seed x", "--seed"),
    ("chat ckpt --seed -5", "--seed"),
    ("chat nosuch", "nosuch"),
    ("chat st_deep", "model.safetensors"),
    ("chat tok_bytes", "tokenizer.json"),
]

EVAL = [
    ("eval ckpt --data corpus.txt --seq-len 0", "--seq-len"),
    ("eval ckpt --data corpus.txt --seq-len -1", "--seq-len"),
    ("eval ckpt --data corpus.txt --batch-size 0", "--batch-size"),
    ("eval ckpt --data corpus.txt --max-batches 0", "--max-batches"),
    ("eval ckpt --data corpus.txt --max-batches -1", "--max-batches"),
    ("eval ckpt --data nosuch.txt", "nosuch.txt"),
    ("eval ckpt --data files", "is a folder"),
    ("eval ckpt --data files/empty.txt", "empty.txt"),
    ("eval nosuch", "nosuch"),
    ("eval st_overlap --data corpus.txt", "overlap"),
]

INFO = [
    ("info", "--preset"),
    ("info --preset nosuch", "nosuch"),
    ("info nosuch", "nosuch"),
    ("info hf_layers", "num_hidden_layers"),
    ("info hf_hidden_str", "hidden_size"),
    ("info hf_cfg_list", "config.json"),
    ("info native_fields_list", "config.json"),
    ("info --preset gpt2-tiny --seq-len -1", "--seq-len"),
    ("info --preset gpt2-tiny --seq-len abc", "--seq-len"),
    ("info file.txt", "file.txt"),
]

PRESETS = [
    ("presets --bogus", "--bogus"),
    ("presets extra", "extra"),
]

CONFIG = [
    ("config nosuch", "nosuch"),
    ("config files/list.json", "list.json"),
    ("config files/nonutf8.toml", "nonutf8.toml"),
    ("config files/deep.json", "deep.json"),
    ("config --optim.lr=NaN", "optim.lr"),
    ("config --model.head_dim=abc", "head_dim"),
    ("config --preset nosuch", "nosuch"),
    ("config --preset gpt2-tiny --train.seed=1e23", "train.seed"),
]

CONVERT = [
    ("convert ckpt out --to onnx", "--to"),
    ("convert ckpt", "dst"),
    ("convert ckpt out", "--to"),
    ("convert nosuch out --to hf", "nosuch"),
    ("convert ckpt file.txt --to nanoseek", "file.txt"),
    ("convert ckpt /proc/x --to nanoseek", "/proc/x"),
    ("convert ckpt file.txt/sub --to nanoseek", "file.txt"),
    ("convert ckpt hf --to hf", "hf"),
    ("convert ckpt out --to hf --dtype int8", "--dtype"),
    ("convert ckpt ckpt --to nanoseek", "ckpt"),
    ("convert st_i32 out --to nanoseek", "int32"),
    ("convert idx_passwd out --to nanoseek", "/etc/passwd"),
]

AVERAGE = [
    ("average", "RUN"),
    ("average nosuch", "nosuch"),
    ("average ckpt", "no checkpoints/ folder"),
    ("average ckpt --last 0", "--last"),
    ("average ckpt --last abc", "--last"),
]

INSPECT = [
    ("inspect nosuch ckpt --prompt x", "nosuch"),
    ("inspect fusion ckpt", "--prompt"),
    ("inspect attention ckpt --prompt hi --layer 99", "--layer"),
    ("inspect attention ckpt --prompt hi --layer -1", "--layer"),
    ("inspect attention ckpt --prompt ''", "prompt"),
    ("inspect attention ckpt --prompt hi --out /proc/x.png", "/proc/x.png"),
    ("inspect attention ckpt --prompt hi --out file.txt/a.png", "file.txt"),
    ("inspect attention nosuch --prompt hi", "nosuch"),
]

EMBED = [
    ("embed ckpt", "--text"),
    ("embed ckpt --file nosuch.txt", "nosuch.txt"),
    ("embed ckpt --file files", "is a folder"),
    ("embed ckpt --file files/nonutf8.txt", "nonutf8.txt"),
    ("embed nosuch --text hi", "nosuch"),
]

TOKENIZER = [
    ("tokenizer", "tokenizer"),
    ("tokenizer frobnicate", "frobnicate"),
    ("tokenizer train", "files"),
    ("tokenizer train nosuch.txt", "nosuch.txt"),
    ("tokenizer train files", "is a folder"),
    ("tokenizer train corpus.txt --vocab-size 10", "vocab"),
    ("tokenizer train corpus.txt --vocab-size -1", "vocab"),
    ("tokenizer train corpus.txt --vocab-size abc", "--vocab-size"),
    ("tokenizer train corpus.txt --kind wordpiece", "wordpiece"),
    ("tokenizer train corpus.txt --out file.txt", "file.txt"),
    ("tokenizer train corpus.txt --out /proc/x/tok.json", "/proc/x"),
    ("tokenizer train corpus.txt --out file.txt/tok.json", "file.txt"),
    ("tokenizer train files/empty.txt --kind char --out t.json", "empty"),
]

BENCH = [
    ("bench nosuch", "nosuch"),
    ("bench train --steps abc", "--steps"),
    ("bench train --bogus", "--bogus"),
    ("bench prefill --rounds x", "--rounds"),
    ("bench attention --heads x", "--heads"),
]

SERVE = [
    ("serve", "ckpt"),
    ("serve ckpt --port abc", "--port"),
    ("serve ckpt --port 0", "--port"),
    ("serve ckpt --port 70000", "--port"),
    ("serve ckpt --max-batch 0", "--max-batch"),
    ("serve ckpt --max-batch 100000000", "--max-batch"),
    ("serve ckpt --max-queue -1", "--max-queue"),
    ("serve ckpt --max-body-bytes 0", "--max-body-bytes"),
    ("serve ckpt --threads -1", "--threads"),
    ("serve nosuch", "nosuch"),
    ("serve st_deep", "model.safetensors"),
]

TOP = [
    ("", "command"),
    ("frobnicate", "frobnicate"),
]

CASES: list[tuple[str, str]] = (
    TRAIN
    + ABLATE
    + SAMPLE
    + CHAT
    + EVAL
    + INFO
    + PRESETS
    + CONFIG
    + CONVERT
    + AVERAGE
    + INSPECT
    + EMBED
    + TOKENIZER
    + BENCH
    + SERVE
    + TOP
)
