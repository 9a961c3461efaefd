"""launch/colab_tpu.ipynb runs top to bottom on CPU (nbclient, a real kernel) with tiny random models served as hub ids
from an offline hub cache and GSM8K-style fixture data, all substituted through its parameter cell."""
import ast
import json
import os

import jax
import nbclient
import nbformat
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def _assigned(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
    return names


def _parameter_cell(nb):
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


def test_parameter_cell_names_hub_models_and_gsm8k():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    scope: dict = {}
    exec(_parameter_cell(nb).source, scope)  # plain assignments only
    assert "/" in scope["POLICY"] and "Instruct" in scope["POLICY"] and "Instruct" in scope["CRITIC"]
    assert scope["DATA"]["path"] == "openai/gsm8k" and scope["DATA"]["name"] == "main"
    assert scope["INSTALL"] is True


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from tiny_hf import add_to_hub_cache, make_tiny_checkpoint

    cache = tmp_path / "hub"
    policy = make_tiny_checkpoint(tmp_path / "policy", "qwen2", hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, num_key_value_heads=2)
    critic = make_tiny_checkpoint(tmp_path / "critic", "llama", seed=1, hidden_size=32, intermediate_size=64)
    add_to_hub_cache(policy, cache, "tiny-org/policy-instruct")
    add_to_hub_cache(critic, cache, "tiny-org/critic-instruct")
    workdir = tmp_path / "run"
    params = f"""
REPO = ""
INSTALL = False
POLICY = "tiny-org/policy-instruct"
CRITIC = "tiny-org/critic-instruct@main"
DATA = dict(source="local", path={os.path.join(FIXTURES, "gsm8k_train.jsonl")!r}, answer_format="gsm8k",
            use_chat_template=True)
EVAL_BENCHMARK, EVAL_DATA_DIR, EVAL_LIMIT = "gsm8k", {os.path.join(FIXTURES, "benchmarks")!r}, 3
STEPS = 2
WORKDIR = {str(workdir)!r}
PROMPTS_PER_STEP, GROUP_SIZE = 2, 4
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 320, 16
CRITIQUES, CRITIC_MAX_NEW_TOKENS = 2, 8
LEARNING_RATE, COMPUTE_DTYPE = 1e-3, "float32"
"""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = _parameter_cell(nb)
    assert _assigned(params) == _assigned(cell.source), "the test's parameters and the notebook's differ"
    cell.source = params
    for key, value in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(cache),
                           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                           MPLBACKEND="module://matplotlib_inline.backend_inline").items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment (8 CPU devices from conftest)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept with the test's tmp folder for a failure's outputs

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    train_cell = [c for c in nb.cells if c.cell_type == "code" and "run.train(" in c.source][0]
    assert any("image/png" in o.get("data", {}) for o in train_cell.outputs), "no live plot"
    assert "step 2/2" in "".join(o.get("text", "") for o in train_cell.outputs)

    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["critic/prompt_tokens"] > 0 and r["train/grad_norm"] is not None for r in rows)  # the GenPRM ran
    stored = json.load(open(workdir / "config.json"))
    assert stored["policy"]["path"] == "tiny-org/policy-instruct" and stored["data"]["path"].endswith("gsm8k_train.jsonl")

    report = json.load(open(workdir / "eval.json"))
    assert report["results"]["gsm8k"]["num_items"] == 3 and "pass@1_greedy" in report["results"]["gsm8k"]

    from capo_jax.checkpoint import Checkpointer
    from capo_jax.models import from_pretrained

    assert Checkpointer(str(workdir)).latest_step() == 2
    exported, initial = from_pretrained(str(workdir / "hf_export")), from_pretrained(str(policy))
    after, before = jax.tree.leaves(nnx.state(exported, nnx.Param)), jax.tree.leaves(nnx.state(initial, nnx.Param))
    assert len(after) == len(before) and any(not np.array_equal(a, b) for a, b in zip(after, before)), \
        "the export holds the starting weights: it is not the trained policy"
