"""Config schema, overrides and each start-up validation error."""
import os
import warnings

import pytest

from capo_jax import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _valid(tmp_path):
    c = C.get_default_config()
    c.policy.path = str(tmp_path)
    c.critic.path = str(tmp_path)
    c.rollout.prompts_per_step, c.rollout.group_size = 4, 4
    c.rl.micro_batch_size = 8
    return c


def test_default_validates(tmp_path):
    C.validate(_valid(tmp_path), num_devices=8)


def test_unknown_key_in_file_and_on_command_line(tmp_path):
    c = _valid(tmp_path)
    c.rollout.group_sise = 8  # a typo in a config file adds a key
    with pytest.raises(C.ConfigError, match=r"unknown config key 'rollout.group_sise'.*did you mean 'rollout.group_size'"):
        C.validate(c)
    with pytest.raises(C.ConfigError, match=r"unknown config key 'rl.clip_hgh'.*'rl.clip_high'"):
        C.parse_args(["--config.rl.clip_hgh=0.3"])


def test_overrides_are_typed(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("from capo_jax.config import get_default_config\n\ndef get_config():\n"
                        "    c = get_default_config()\n    c.rollout.group_size = 4\n    return c\n")
    c, rest = C.parse_args(["--config", str(cfg_file), "--config.rollout.group_size=8", "--config.rl.kl_coef", "0.05",
                            "--config.logging.progress=false", "--config.reward.step_delimiter=\\n", "--workdir", "/tmp/w", "extra"])
    assert c.rollout.group_size == 8 and c.rl.kl_coef == 0.05 and c.logging.progress is False
    assert c.reward.step_delimiter == "\n" and c.workdir == "/tmp/w" and rest == ["extra"]
    with pytest.raises(C.ConfigError, match="give a int"):
        C.parse_args(["--config.rollout.group_size=eight"])
    # a template typed in a shell: \n is a newline, LaTeX and non-ASCII text stay as typed
    c, _ = C.parse_args(["--config.data.template={question}\\nPut it in \\boxed{{}}, \\text{é}."])
    assert c.data.template == "{question}\nPut it in \\boxed{{}}, \\text{é}."


def test_divisibility_errors(tmp_path):
    c = _valid(tmp_path)
    c.rl.num_minibatches = 3
    with pytest.raises(C.ConfigError, match=r"rollout batch 4x4=16 is not divisible by rl.num_minibatches=3"):
        C.validate(c, num_devices=8)
    c = _valid(tmp_path)
    c.rl.micro_batch_size = 6
    with pytest.raises(C.ConfigError, match=r"mini-batch 16 is not divisible by rl.micro_batch_size=6"):
        C.validate(c, num_devices=8)
    c = _valid(tmp_path)
    c.rl.micro_batch_size = 4  # divides the mini-batch but not the 8 data-parallel shards
    with pytest.raises(C.ConfigError, match=r"rl.micro_batch_size=4 is not divisible by the data-parallel size 8"):
        C.validate(c, num_devices=8)
    c = _valid(tmp_path)
    c.rollout.group_size = 1
    with pytest.raises(C.ConfigError, match=r"rollout.group_size=1: group advantages need at least 2"):
        C.validate(c, num_devices=8)
    c = _valid(tmp_path)
    c.mesh.data, c.mesh.fsdp = 3, 2
    with pytest.raises(C.ConfigError, match=r"does not fit the policy's 8 devices"):
        C.validate(c, num_devices=8)
    c = _valid(tmp_path)
    c.critic.devices = "last:4"
    c.rl.micro_batch_size = 8
    C.validate(c, num_devices=8)  # 4 policy devices left, the batch splits 4 ways


def test_missing_paths(tmp_path):
    c = _valid(tmp_path)
    c.policy.path = str(tmp_path / "nope")
    with pytest.raises(C.ConfigError, match=r"policy.path=.*nope' does not exist"):
        C.validate(c)
    c = _valid(tmp_path)
    c.critic.path = ""
    with pytest.raises(C.ConfigError, match=r"critic.path is not set: pass --config.critic.path="):
        C.validate(c)
    c.critic.path = str(tmp_path / "missing_critic")
    with pytest.raises(C.ConfigError, match=r"critic.path=.*missing_critic' does not exist"):
        C.validate(c)
    c = _valid(tmp_path)
    c.data.source, c.data.path = "local", str(tmp_path / "train*.jsonl")
    with pytest.raises(C.ConfigError, match=r"data.path=.* matches no file"):
        C.validate(c)
    c.reward.mode = "grpo"  # no critic needed: an unset critic path is fine then
    c.critic.path = ""
    c.data.source = "arithmetic"
    C.validate(c)


def test_choices_and_weight_warning(tmp_path):
    c = _valid(tmp_path)
    c.rl.loss_agg = "seq_mean"
    with pytest.raises(C.ConfigError, match=r"rl.loss_agg='seq_mean' is not one of"):
        C.validate(c)
    c = _valid(tmp_path)
    c.reward.w_process = 2.0
    with pytest.warns(UserWarning, match="w_process=2.0 >= reward.w_whole=2.0"):
        C.validate(c)


@pytest.mark.parametrize("name", ["qwen2.5_1.5b", "llama3.2_1b"])
def test_paper_configs_need_their_paths(name):
    c = C.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
    with pytest.raises(C.ConfigError, match=r"(policy|critic|data)\.path"):
        C.validate(c)


def test_demo_config_validates():
    c = C.load_config_file(os.path.join(REPO, "configs", "demo.py"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.validate(c, num_devices=1)


@pytest.mark.parametrize("c_dual,ok", [(0.0, True), (3.0, True), (1.01, True), (1.0, False), (0.5, False), (-3.0, False)])
def test_dual_clip_needs_c_above_one_or_zero(tmp_path, c_dual, ok):
    from capo_jax.rl.train_step import StepOptions

    c = _valid(tmp_path)
    c.rl.clip_ratio_c = c_dual
    if ok:
        C.validate(c)
        assert StepOptions.from_config(c).clip_ratio_c == c_dual
    else:
        with pytest.raises(C.ConfigError, match=r"rl.clip_ratio_c=.*needs c > 1.*clip_ratio_c=0 to turn it off"):
            C.validate(c)
