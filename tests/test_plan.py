"""The planner's parts that need no TPU compiler: slice names, model shapes from presets, the command line."""
import json

import pytest

from capo_jax.models import ModelConfig
from capo_jax.plan import analytic, shapes, topology


def test_slice_names():
    assert topology.parse_slice("v5e-16").topology == "v5e:4x4"
    assert topology.parse_slice("v5litepod-8").topology == "v5e:2x4"
    v4 = topology.parse_slice("v4-8")
    assert v4.topology == "v4:2x2x1" and v4.chips == 4  # v4 / v5p names count TensorCores, two per chip
    assert topology.parse_slice("v5p-16").topology == "v5p:2x2x2"
    assert topology.parse_slice("v6e:2x2").chips == 4
    assert topology.parse_slice("v6e-8").chip.peak_flops == 918e12
    for bad, message in (("v5p-7", "multiple of 2"), ("tpu", "slice name"), ("v9e-8", "unknown TPU generation"),
                         ("v5e-12", "no standard"), ("v4:2x2", "3D shape")):
        with pytest.raises(ValueError, match=message):
            topology.parse_slice(bad)


def test_device_limits_split_a_chip_between_its_devices():
    v4 = topology.parse_slice("v4-8")
    assert topology.device_limits(v4, 8).hbm_bytes == 16 * topology.GiB  # libtpu shows v4's cores as devices
    v5e = topology.parse_slice("v5e-8")
    assert topology.device_limits(v5e, 8).hbm_bandwidth == 819e9


@pytest.mark.parametrize("hub, params", [("Qwen/Qwen2.5-1.5B", 1.544e9), ("Qwen/Qwen2.5-7B-Instruct", 7.616e9),
                                         ("Qwen/Qwen2.5-72B-Instruct", 72.706e9), ("meta-llama/Llama-3.2-1B-Instruct", 1.236e9),
                                         ("meta-llama/Llama-3.2-3B-Instruct", 3.213e9), ("meta-llama/Llama-3.1-8B-Instruct", 8.030e9)])
def test_presets_have_the_published_parameter_counts(hub, params):
    cfg = shapes.model_config(hub, dtype="bfloat16", param_dtype="bfloat16")
    embed = cfg.vocab_size * cfg.hidden_size
    count = (embed * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
             + cfg.num_layers * (analytic.layer_matmul_params(cfg) + 2 * cfg.hidden_size
                                 + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * cfg.attention_bias))
    assert abs(count / params - 1) < 1e-3
    assert shapes.model_config(hub.split("/")[1].lower(), dtype="float32", param_dtype="float32") == \
        cfg.replace(dtype="float32", param_dtype="float32")


def test_shape_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig(num_layers=3).to_hf()))
    assert shapes.role_source(str(tmp_path), "", "policy") == str(tmp_path)
    assert shapes.model_config(str(tmp_path), dtype="float32", param_dtype="float32").num_layers == 3
    assert shapes.role_source("", "Qwen/Qwen2.5-1.5B", "policy") == "Qwen/Qwen2.5-1.5B"
    with pytest.raises(ValueError, match="policy.model_id"):
        shapes.role_source("", "", "policy")
    with pytest.raises(ValueError, match="preset"):
        shapes.hf_config("Nobody/NoModel-1B")


def test_train_flops_count_every_pass():
    cfg = shapes.model_config("Qwen/Qwen2.5-1.5B", dtype="bfloat16", param_dtype="float32")
    layers, head = analytic.forward_flops(cfg, 1536, 1024)
    base = analytic.train_step_flops(cfg, rows=1, prompt_len=512, response_len=1024, ppo_epochs=1, remat=False,
                                     logprob_remat=False, recompute_old=False, reference=False)
    assert base == 3 * (layers + head)
    full = analytic.train_step_flops(cfg, rows=2, prompt_len=512, response_len=1024, ppo_epochs=1, remat=True,
                                     logprob_remat=True, recompute_old=True, reference=True)
    assert full == 2 * (3 * (layers + head) + layers + head + 2 * (layers + head))


def test_cli_without_libtpu_says_how_to_install(monkeypatch, capsys):
    from capo_jax.plan.__main__ import main

    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    assert main(["--config", "configs/qwen2.5_1.5b.py"]) == 2
    err = capsys.readouterr().err
    assert "pip install libtpu==0.0.42.1" in err
    assert main(["--config", "configs/demo.py"]) == 2
    assert "--topology" in capsys.readouterr().err


def _roles(critic_shared=True):
    import jax

    from capo_jax import config as config_lib, parallel
    from capo_jax.plan import programs

    config = config_lib.load_config_file("configs/qwen2.5_1.5b.py")
    mesh = parallel.make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.devices())
    policy = shapes.model_config("Qwen/Qwen2.5-1.5B", dtype="bfloat16", param_dtype="float32")
    critic = shapes.model_config("Qwen/Qwen2.5-72B-Instruct", dtype="bfloat16", param_dtype="bfloat16")
    critic_mesh = parallel.make_mesh(data=1, fsdp=1, tensor=-1, devices=jax.devices())
    return programs.Roles(config=config, slice=topology.parse_slice("v5e-8"), devices=jax.devices(),
                          policy_mesh=mesh, critic_mesh=critic_mesh, policy=policy, critic=critic,
                          critic_shared=critic_shared)


def _program(name, role, phase, argument, output, alias, temp, holds_resident):
    from capo_jax.plan import programs

    return programs.Program(name=name, role=role, phase=phase, seconds=0.0,
                            memory=programs.Memory(argument, output, alias, temp), flops=1e12, hbm_bytes=1e9,
                            collectives={"all-reduce": (2.0, 4e6)}, undetermined_trips=[], per=1, unit="call",
                            analytic_flops=1e12, analytic_bytes=None, holds_resident=holds_resident)


def test_phase_memory_adds_what_each_phase_holds():
    from capo_jax.plan import programs
    from capo_jax.plan.report import phase_memory

    G = topology.GiB
    roles = _roles()
    res = {"policy": programs.Resident(params=1 * G, optimizer=2 * G),
           "rollout": programs.Resident(rollout_copy=3 * G, kv_cache=1 * G),
           "critic": programs.Resident(params=4 * G, kv_cache=2 * G)}
    progs = [_program("train step", "policy", "train", 3.5 * G, 3 * G, 3 * G, 2 * G, True),
             _program("rollout decode", "policy", "rollout", 4.25 * G, 1 * G, 1 * G, 0.5 * G, False),
             _program("critic decode", "critic", "critic", 6 * G, 2 * G, 2 * G, 1 * G, False)]
    train, rollout, critic = phase_memory(progs, res, roles)
    assert train.total == 3.5 * G + 2 * G + 4 * G  # the step's arguments hold params + optimizer; shared critic
    assert train.parts["other arguments"] == 0.5 * G and train.parts["critic weights"] == 4 * G
    assert rollout.total == 3 * G + 4.25 * G + 0.5 * G + 4 * G  # resident policy + copy + cache + rest + critic
    assert rollout.parts["other arguments"] == 0.25 * G
    assert critic.total == 6 * G + 1 * G + 3 * G and critic.parts["KV cache"] == 2 * G
    assert critic.fits and abs(critic.spare - (1 - 10 / 16)) < 1e-9


def test_alternatives_shrink_the_failing_phase():
    from capo_jax.plan.planner import candidates

    roles = _roles()
    train = candidates(roles.config, "train", roles)
    assert train[0] == ("rl.micro_batch_size=16", {"rl.micro_batch_size": 16})
    assert any(overrides.get("mesh.tensor") == 2 for _, overrides in train)
    critic = candidates(roles.config, "critic", roles)
    assert [d for d, _ in critic][:2] == ["critic.batch_size=2", "critic.batch_size=1"]
