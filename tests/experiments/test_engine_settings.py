"""The engine settings the experiments assume are the ones the product ships: every
``profile_overrides`` of a shipped scenario on the engine the manifest serves (Llama-3.1-8B on an
H100, profile ``llama-3.1-8b-h100``) is a flag of the vLLM manifest in ``k8s/examples``. The
paper's scenarios model the paper's own engine (its profile, its slots) and are not the product's."""

from __future__ import annotations

from pathlib import Path

import yaml

from tokenscaler.experiments.scenario import load_scenario, shipped_scenarios

ROOT = Path(__file__).resolve().parents[2]
SERVED_PROFILE = "llama-3.1-8b-h100"  # the model and GPU of k8s/examples/vllm.yaml
# a profile field -> vLLM's flag for it
FLAGS = {"long_prefill_token_threshold": "--long-prefill-token-threshold", "max_num_seqs": "--max-num-seqs",
         "max_num_batched_tokens": "--max-num-batched-tokens", "scheduling_policy": "--scheduling-policy"}  # fmt: skip


def shipped_vllm_args() -> dict[str, str]:
    docs = list(yaml.safe_load_all((ROOT / "k8s/examples/vllm.yaml").read_text()))
    deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    vllm = next(c for c in containers if "vllm" in c["image"])
    return dict(a.split("=", 1) for a in vllm["args"] if a.startswith("--") and "=" in a)


def test_every_engine_override_of_a_shipped_scenario_is_what_the_vllm_manifest_sets() -> None:
    args = shipped_vllm_args()
    overridden = {}
    for name in shipped_scenarios():
        if load_scenario(name).scenario.profile != SERVED_PROFILE:
            continue
        for field, value in (load_scenario(name).scenario.profile_overrides or {}).items():
            overridden[(name, field)] = value
            assert field in FLAGS, f"scenario {name} overrides {field}, which no shipped vLLM flag sets"
            assert args.get(FLAGS[field]) == str(value), (
                f"scenario {name} runs the engine with {field}={value}; k8s/examples/vllm.yaml has "
                f"{FLAGS[field]}={args.get(FLAGS[field])}"
            )
    assert not overridden, f"the served engine's experiments assume settings beyond vLLM's defaults: {overridden}"
