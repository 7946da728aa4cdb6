"""Does a tiny model diverge (NaN/inf) in 200 AdamW steps at a high learning rate? residual vs hyper vs mhc.

python benchmarks/fusion_stability.py
"""

import torch

from nanoseek import ModelConfig, Transformer

torch.set_num_threads(2)
for fusion in ["residual", "hyper", "mhc"]:
    for lr in [3e-2, 1e-1]:
        torch.manual_seed(0)
        m = Transformer(ModelConfig.from_preset("deepseek-v3-tiny", fusion=fusion, hc_mult=2))
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        first_bad = None
        last = None
        for step in range(200):
            x = torch.randint(0, 128, (4, 16), generator=g)
            out = m(x[:, :-1], targets=x[:, 1:])
            loss = out.loss + sum(out.aux.values())
            if not torch.isfinite(loss):
                first_bad = step
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            m.update_balance_bias(out.expert_load)
            last = loss.item()
        print(
            f"{fusion:9s} lr={lr:g}: "
            + (
                f"non-finite at step {first_bad}"
                if first_bad is not None
                else f"finite for 200 steps, last loss {last:.3f}"
            )
        )
