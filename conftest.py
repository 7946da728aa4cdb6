"""Collection of the docstring examples in src/: modules whose optional extra is not installed are
skipped rather than failing the whole run (their tests skip with a reason on their own)."""

import importlib.util

OPTIONAL = {
    "src/nanoseek/serve/*.py": ("fastapi", "uvicorn", "httpx", "prometheus_client"),
    "src/nanoseek/train/evaluate_pairs.py": ("sacrebleu",),
}

collect_ignore_glob = [
    pattern for pattern, packages in OPTIONAL.items() if not all(importlib.util.find_spec(name) for name in packages)
]
