"""The paper's testbed profile: 16 slots at ~240 generated tokens/s at full batch."""

from __future__ import annotations

from tokenscaler.sim.engine import Engine
from tokenscaler.sim.profile import load_profile


def test_paper_profile_calibration() -> None:
    profile = load_profile("paper-dgx-spark")
    assert profile.max_num_seqs == 16
    engine = Engine(profile)
    n = 0
    for i in range(16):  # 16 concurrent 64/64 requests, closed loop, for 60 s
        engine.add_request(f"r{i}", 64, 64, 0.0)
    generated = 0
    t = 0.0
    while t < 60.0:
        res = engine.step(engine.busy_until_s)
        t = res.end_s
        generated += res.num_generated_tokens
        for _ in res.finished:
            n += 1
            engine.add_request(f"n{n}", 64, 64, t)
    rate = generated / t
    assert 228 <= rate <= 252, rate  # the paper's ~240 tokens/s, within 5%
