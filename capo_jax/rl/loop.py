"""The CAPO training loop: one function per phase (rollout, verify, steps, critique, assemble) around the jitted update.

`Run(config).train()` builds the roles (policy, optional reference, critic), resumes from the
workdir's latest checkpoint, and repeats: sample G responses per prompt with the live policy,
score them with the rule verifier, split them into steps, critique every response M times,
vote, and update the policy in one jitted, sharded step. Checkpoints are saved every N steps,
at the end and on SIGTERM; metrics go to the console, TensorBoard and `metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import weakref
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from capo_jax import checkpoint as ckpt_lib
from capo_jax import config as config_lib
from capo_jax import multihost, parallel
from capo_jax.critic.base import CritiqueRequest
from capo_jax.metrics import MetricsWriter, PhaseTimer
from capo_jax.rl.train_step import PolicyTrainer, StepOptions, make_optimizer

log = logging.getLogger("capo_jax.train")


# ---------------------------------------------------------------------------------------------
# Roles


def policy_devices(config: ml_collections.ConfigDict) -> tuple[list, list | None]:
    """The devices of the policy and of the critic (None when the critic shares the policy's)."""
    return config_lib.role_devices(config, jax.devices())


def make_critic(config: ml_collections.ConfigDict, *, mesh: Any = None):
    """The critic backend `config.critic.backend` names, or None when the reward mode needs no critic."""
    if config.reward.mode == "grpo":
        return None
    backend = config.critic.backend
    if backend == "rule":
        try:
            from capo_jax.critic.rule import RuleCritic
        except ImportError as exc:
            raise ValueError(f"critic.backend='rule' needs capo_jax.critic.rule, which failed to import: {exc}") from exc
        return RuleCritic(misjudge_prob=float(config.critic.misjudge_prob), index_base=int(config.critic.index_base))
    if backend == "genprm":
        try:
            from capo_jax.critic.genprm import GenPRMCritic
        except ImportError as exc:
            raise ValueError(f"critic.backend='genprm' needs capo_jax.critic.genprm, which failed to import: {exc}") from exc
        return GenPRMCritic.from_config(config.critic, mesh=mesh, rules=parallel.RULES[config.mesh.critic_rules]())
    raise ValueError(f"critic.backend={backend!r}: use 'genprm' or 'rule'")


def resolve_policy_path(config: ml_collections.ConfigDict, logger=print) -> str:
    """The policy's HF folder: config.policy.path, or the demo policy from the bootstrap cache (trained on first use).

    On several processes process 0 builds the bootstrap first while the others wait; they then reuse it (a cache
    folder they share) or build the same one (a cache of their own), and all check they hold the same weights."""
    if config.policy.path:
        return config.policy.path
    from capo_jax.demo.bootstrap import cached_bootstrap

    def build() -> str:
        return cached_bootstrap(str(config.demo.cache_dir), world=config.data.world.to_dict(),
                                model=config.demo.model.to_dict(), sft=config.demo.sft.to_dict(), log=logger)

    if multihost.process_count() == 1:
        return build()
    path, failure = None, None
    for turn in ("lead", "others"):
        if (turn == "lead") == multihost.is_lead():
            try:
                path = build()
            except Exception as exc:  # noqa: BLE001 - said on every process below, then raised here
                failure = exc
        multihost.barrier(f"bootstrap-{turn}")
    if multihost.any_process(failure is not None):
        if failure is not None:
            raise failure
        raise RuntimeError("the demo bootstrap failed on another process: see its output")
    digests = multihost.allgather_objects(_folder_digest(path))
    if len(set(digests)) > 1:
        raise config_lib.ConfigError(
            f"the processes built different demo policies ({path} on process {jax.process_index()}): point "
            "demo.cache_dir (or CAPO_JAX_CACHE) at a folder every host shares, so all read process 0's")
    return path


def _folder_digest(path: str) -> str:
    """A hash of a model folder's weights and config (to check every process loads the same model)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") or name == "config.json":
            with open(os.path.join(path, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def load_tokenizer(path: str):
    """The policy's tokenizer (local files only, no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Phases (host side)


@dataclasses.dataclass
class Rollout:
    """One rollout batch: B = P x G rows, sample j of prompt i at row i * G + j."""

    examples: list  # the P prompts (capo_jax.data Example)
    prompt_ids: np.ndarray  # int32[B, P_max] left-padded
    prompt_mask: np.ndarray  # bool[B, P_max]
    response_ids: np.ndarray  # int32[B, T]
    response_mask: np.ndarray  # bool[B, T] (tokens up to and including the stop token)
    sampler_logp: np.ndarray  # float32[B, T]
    lengths: np.ndarray  # int32[B]
    texts: list[str]  # decoded responses without the stop token
    stopped: np.ndarray  # bool[B] ended on a stop token (not truncated)


def stop_ids(tokenizer: Any, model_config: Any) -> tuple[int, ...]:
    """Token ids that end a response: the tokenizer's EOS and the model config's."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = model_config.eos_token_id
    ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in (eos or ())])
    return tuple(sorted(ids))


def rollout_params(config: ml_collections.ConfigDict, pad: int, stops: tuple[int, ...] = ()):
    """How the policy samples its G responses per prompt (`rollout.*`)."""
    from capo_jax.sampling import SamplingParams

    ro = config.rollout
    return SamplingParams(n=int(ro.group_size), temperature=float(ro.temperature), top_k=int(ro.top_k),
                          top_p=float(ro.top_p), max_new_tokens=int(ro.max_new_tokens), stop_token_ids=stops,
                          kv_cache_dtype=ro.kv_cache_dtype or None, pad_token_id=int(pad))


def rollout_phase(model: Any, tokenizer: Any, examples: Sequence[Any], config: ml_collections.ConfigDict, rng: jax.Array,
                  mesh: Any, stops: tuple[int, ...], rules: Any = None, prompt_index: Sequence[int] | None = None) -> Rollout:
    """Sample G responses per prompt with `model` (the policy's inference copy); pad prompts to
    rollout.max_prompt_len. `prompt_index`: each prompt's position in the step's global batch (its samples' keys)."""
    from capo_jax.sampling import generate

    ro = config.rollout
    G, P, T = int(ro.group_size), int(ro.max_prompt_len), int(ro.max_new_tokens)
    prompts = [list(ex.prompt_ids)[-P:] for ex in examples]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    params = rollout_params(config, pad, stops)
    res = generate(model, prompts, params, rng, mesh, rules=rules, prompt_index=prompt_index)
    tokens = np.asarray(res.tokens, np.int32)
    lengths = np.asarray(res.lengths, np.int32)
    B = len(prompts) * G
    prompt_ids = np.full((B, P), pad, np.int32)
    prompt_mask = np.zeros((B, P), bool)
    for i, p in enumerate(prompts):
        prompt_ids[i * G:(i + 1) * G, P - len(p):] = p
        prompt_mask[i * G:(i + 1) * G, P - len(p):] = True
    response_mask = np.arange(T)[None] < lengths[:, None]
    stopset = set(stops)
    texts, stopped = [], np.zeros(B, bool)
    for b in range(B):
        ids = tokens[b, :lengths[b]].tolist()
        if ids and ids[-1] in stopset:
            ids, stopped[b] = ids[:-1], True
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return Rollout(list(examples), prompt_ids, prompt_mask, np.where(response_mask, tokens, pad).astype(np.int32),
                   response_mask, np.where(response_mask, res.logprobs, 0.0).astype(np.float32), lengths, texts, stopped)


def verify_phase(texts: Sequence[str], references: Sequence[str], config: ml_collections.ConfigDict) -> np.ndarray:
    """Outcome r_i in {0, 1} per response; a response the verifier cannot score counts as wrong."""
    from capo_jax.rewards import verify

    kw = dict(timeout=float(config.reward.verify_timeout), answer_format=str(config.reward.answer_format))
    try:
        return np.asarray(verify.score(list(texts), list(references), **kw), np.float32)
    except Exception as exc:  # one bad item must not stop training: score the rest one by one
        log.warning("verifier failed on the batch (%s); scoring responses one by one", exc)
        out = np.zeros(len(texts), np.float32)
        for i, (t, r) in enumerate(zip(texts, references)):
            try:
                out[i] = float(verify.score([t], [r], **kw)[0])
            except Exception:  # noqa: BLE001 - the response is counted wrong
                out[i] = 0.0
        return out


def steps_phase(rollout: Rollout, tokenizer: Any, config: ml_collections.ConfigDict):
    """token_step int32[B, T] and the step texts of every response."""
    from capo_jax.rewards.steps import attach_unstepped_tokens, batch_token_steps

    result = batch_token_steps(rollout.response_ids, tokenizer, lengths=rollout.lengths,
                               delimiter=str(config.reward.step_delimiter), max_steps=int(config.reward.max_steps),
                               width=rollout.response_ids.shape[1])
    if str(config.reward.unstepped_tokens) == "nearest":
        result = dataclasses.replace(result, token_step=attach_unstepped_tokens(result.token_step, rollout.response_mask))
    return result


@dataclasses.dataclass
class CritiqueResult:
    """Parsed critic output for one batch."""

    votes: np.ndarray  # bool[B, M, S]
    vote_valid: np.ndarray  # bool[B, M]
    outcome: np.ndarray | None  # float32[B] critic-judged outcome (genorm), else None
    requested: int  # critiques asked for
    failed_calls: int  # critic calls that raised (their rows degrade to outcome-only)
    prompt_tokens: int
    generated_tokens: int
    whole_batch: bool = False  # the counts cover every process's rows (else this process's)


def _requests(rollout: Rollout, steps: Sequence[Sequence[str]], include_reference: bool) -> list[CritiqueRequest]:
    G = len(rollout.texts) // max(len(rollout.examples), 1)
    out = []
    for b, row_steps in enumerate(steps):
        ex = rollout.examples[b // G]
        out.append(CritiqueRequest(question=ex.question, steps=tuple(row_steps) or (rollout.texts[b],),
                                   reference=ex.answer if include_reference else None))
    return out


def _critique_texts(critic: Any, requests: Sequence[CritiqueRequest], M: int, bs: int, mode: str,
                    rng: np.random.Generator) -> tuple[list[list[str]], int, int, int]:
    """Up to M critique texts per request, `bs` requests per critic call; (texts, failed calls, prompt tokens,
    generated tokens)."""
    texts: list[list[str]] = []
    failed = prompt_tokens = generated = 0
    for lo in range(0, len(requests), bs):
        chunk = requests[lo:lo + bs]
        try:
            got = (critic.judge_outcome if mode == "genorm" else critic.critique)(chunk, M, rng)
            if len(got) != len(chunk):
                raise ValueError(f"critic returned {len(got)} results for {len(chunk)} requests")
            stats = critic.last_stats
            prompt_tokens += int(stats.prompt_tokens)
            generated += int(stats.generated_tokens)
        except Exception as exc:  # noqa: BLE001 - a failing critic degrades these rows to outcome-only
            log.warning("critic call failed for rows %d..%d (%s): outcome-only for them", lo, lo + len(chunk) - 1, exc)
            failed += 1
            got = [[] for _ in chunk]
        texts.extend([list(t)[:M] if isinstance(t, (list, tuple)) else [] for t in got])
    return texts, failed, prompt_tokens, generated


def _all_requests(requests: Sequence[CritiqueRequest], rows: np.ndarray, total: int) -> list[CritiqueRequest]:
    """The requests of every process's rows, in global row order (`rows`: this process's rows' global indices)."""
    full: list[CritiqueRequest | None] = [None] * total
    mine = [[r.question, list(r.steps), r.reference] for r in requests]
    for index, pieces in multihost.allgather_objects([[int(i) for i in rows], mine]):
        for i, (question, steps, reference) in zip(index, pieces):
            full[i] = CritiqueRequest(question=question, steps=tuple(steps), reference=reference)
    return full  # type: ignore[return-value]


def critique_phase(critic: Any, rollout: Rollout, steps: Sequence[Sequence[str]], config: ml_collections.ConfigDict,
                   rng: np.random.Generator, outcome: np.ndarray, rows: np.ndarray | None = None,
                   total: int | None = None) -> CritiqueResult:
    """Critique every response M times and parse the verdicts; anything unusable is an invalid vote.

    On several processes (`rows`: the global indices of this process's rows of a `total`-row batch), a critic with
    a mesh (GenPRM) critiques each process's own rows on that mesh, every process calling it alike; a critic
    without one (the rule critic, host-side) judges the whole batch on every process with the step's one random
    stream, as one process would, and each keeps its rows (its counts then cover the whole batch)."""
    from capo_jax.critic import INVALID, parse_outcome_verdict, parse_verdict
    from capo_jax.rewards.credit import votes_from_verdicts

    B, M, S = len(rollout.texts), int(config.critic.num_critiques), int(config.reward.max_steps)
    mode = config.reward.mode
    empty = CritiqueResult(np.zeros((B, M, S), bool), np.zeros((B, M), bool), None, 0, 0, 0, 0)
    if critic is None or mode == "grpo":
        return empty
    requests = _requests(rollout, steps, bool(config.critic.include_reference))
    bs = max(int(config.critic.batch_size), 1) if config.critic.backend == "genprm" else B
    whole = False
    if multihost.process_count() > 1 and getattr(critic, "mesh", None) is None and rows is not None:
        everyone = _all_requests(requests, rows, int(total))
        texts, failed, prompt_tokens, generated = _critique_texts(critic, everyone, M, len(everyone), mode, rng)
        texts = [texts[int(i)] for i in rows]
        whole = True
    else:
        texts, failed, prompt_tokens, generated = _critique_texts(critic, requests, M, bs, mode, rng)
    if mode == "genorm":
        judged = outcome.astype(np.float32).copy()
        valid = np.zeros((B, M), bool)
        for b, row in enumerate(texts):
            verdicts = [parse_outcome_verdict(t) for t in row]
            ok = [v for v in verdicts if v is not INVALID]
            valid[b, :len(verdicts)] = [v is not INVALID for v in verdicts]
            if ok:  # majority of the valid judgements; no valid one: keep the rule verifier's outcome
                judged[b] = float(2 * sum(bool(v) for v in ok) > len(ok))
        return CritiqueResult(np.zeros((B, M, S), bool), valid, judged, B * M, failed, prompt_tokens, generated, whole)
    verdicts = []
    for b, row in enumerate(texts):
        n_steps = len(steps[b]) or 1
        verdicts.append([parse_verdict(t, n_steps, index_base=int(config.critic.index_base)) for t in row])
    votes, valid = votes_from_verdicts(verdicts, B, M, S)
    return CritiqueResult(votes, valid, None, B * M, failed, prompt_tokens, generated, whole)


def critic_agreement(votes: np.ndarray, valid: np.ndarray, num_steps: np.ndarray) -> float:
    """Fraction of (response, step) pairs on which all valid critiques agree (rows with >= 2 valid critiques)."""
    agree, total = 0, 0
    for b in range(votes.shape[0]):
        rows = votes[b][valid[b]]
        n = min(int(num_steps[b]), votes.shape[2])
        if rows.shape[0] < 2 or n == 0:
            continue
        cols = rows[:, :n]
        agree += int(np.sum(cols.all(0) | (~cols).all(0)))
        total += n
    return agree / total if total else float("nan")


def flagged_step_fraction(votes: np.ndarray, valid: np.ndarray, num_steps: np.ndarray) -> float:
    """Fraction of (valid critique, real step) pairs that the critique flags as wrong."""
    steps = np.minimum(num_steps, votes.shape[2])
    real = np.arange(votes.shape[2])[None, None, :] < steps[:, None, None]
    pairs = real & valid[:, :, None]
    return float(votes[pairs].mean()) if pairs.any() else 0.0


def assemble_batch(rollout: Rollout, token_step: np.ndarray, outcome: np.ndarray, crit: CritiqueResult) -> dict[str, np.ndarray]:
    """The fixed-shape arrays the jitted step takes."""
    return {
        "prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
        "response_ids": rollout.response_ids, "response_mask": rollout.response_mask,
        "token_step": np.where(rollout.response_mask, token_step, -1).astype(np.int32),
        "outcome": outcome.astype(np.float32), "votes": crit.votes, "vote_valid": crit.vote_valid,
        "sampler_logp": rollout.sampler_logp,
    }


# ---------------------------------------------------------------------------------------------
# The run


class StopTraining(Exception):
    """Raised to end the run early (too many consecutive non-finite updates)."""


class Run:
    """Everything one training run holds: mesh, roles, trainer, data, checkpoints, metrics."""

    def __init__(self, config: ml_collections.ConfigDict, *, stream: Any = None) -> None:
        config_lib.validate(config, num_devices=len(jax.devices()), num_processes=jax.process_count())
        self.config = config
        self.workdir = os.path.abspath(config.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._stream = stream
        self._stop_signal = False
        self.writer: MetricsWriter | None = None
        self._lock = None
        self._hold_lock()  # before anything writes into the workdir

        pol_devices, _ = policy_devices(config)
        m = config.mesh
        self.mesh = parallel.make_mesh(int(m.data), int(m.fsdp), int(m.tensor), devices=pol_devices)
        self.groups, self.rows = self._my_rows()
        from capo_jax.hub import resolve_model_paths

        models = resolve_model_paths(config, log=self._log)  # hub ids -> local snapshots; self.config keeps the ids
        self.policy_path = resolve_policy_path(models, logger=self._log)
        self.tokenizer = load_tokenizer(self.policy_path)

        from capo_jax.models import from_pretrained

        compute = config.optim.compute_dtype
        self.model = from_pretrained(self.policy_path, dtype=compute, param_dtype=config.policy.param_dtype,
                                     mesh=self.mesh, rules=parallel.RULES[m.policy_rules](), remat=bool(config.policy.remat))
        reference = None
        if float(config.rl.kl_coef) > 0:
            ref_path = models.reference.path or self.policy_path
            reference = from_pretrained(ref_path, dtype=config.reference.dtype, param_dtype=config.reference.dtype,
                                        mesh=self.mesh, rules=parallel.RULES[m.reference_rules]())
        self.opts = StepOptions.from_config(config)
        total_updates = int(config.total_steps) * self.opts.updates_per_step
        optimizer, self.schedule = make_optimizer(config.optim, total_updates)
        self.trainer = PolicyTrainer(self.model, self.opts, optimizer, self.mesh, rules=parallel.RULES[m.policy_rules](),
                                     reference=reference, reference_rules=parallel.RULES[m.reference_rules]())
        del reference  # the trainer keeps the reference's parameters only
        from capo_jax.sampling import InferenceCopy

        # rollouts read a compute-dtype copy of the policy in the inference layout, refreshed once per step
        self.rollout_copy = InferenceCopy(self.model, self.mesh, parallel.RULES[m.rollout_rules]())
        self.critic = make_critic(models)
        if multihost.process_count() > 1:
            self._log(f"[train] process {jax.process_index()} of {jax.process_count()}: {_placement('policy', self.mesh)}"
                      + (f", {_placement('critic', self.critic.mesh)}" if getattr(self.critic, "mesh", None) is not None else ""))
        self.stops = stop_ids(self.tokenizer, self.model.config)

        from capo_jax.data import build_source

        data_cfg = config.data.to_dict()
        data_cfg["max_prompt_tokens"] = min(int(data_cfg.get("max_prompt_tokens", 10**9)), int(config.rollout.max_prompt_len))
        # every process walks the one global stream and samples the prompts of the rows it holds (self.groups)
        self.source = build_source(data_cfg, self.tokenizer, process_index=0, process_count=1)
        self.base_key = jax.random.key(int(config.seed))
        self.checkpointer = ckpt_lib.Checkpointer(self.workdir, keep=int(config.checkpoint.keep),
                                                  every=int(config.checkpoint.every),
                                                  async_save=bool(config.checkpoint.async_save))
        self.step = 0
        self._resume()
        if jax.process_index() == 0:
            ckpt_lib.save_run_files(self.workdir, config.to_dict(), self.policy_path, self.model.config.to_hf())

    # -- helpers

    def _log(self, message: str) -> None:
        if self.writer is not None:
            self.writer.log(message)
        else:
            import sys

            print(message, file=self._stream or sys.stderr, flush=True)

    def _hold_lock(self) -> None:
        """Own workdir/.lock (process 0 only): WorkdirBusy when a live trainer has it (on every process: they agree
        before going on); released when training ends."""
        from capo_jax import lock

        failure = None
        if jax.process_index() == 0 and not (self._lock is not None and self._lock.held()):
            try:
                self._lock = lock.acquire(self.workdir, log=self._log)
                weakref.finalize(self, self._lock.release)  # also at interpreter exit, and after an exception in __init__
            except lock.WorkdirBusy as exc:
                failure = exc
        if multihost.any_process(failure is not None):
            raise failure or lock.WorkdirBusy(f"process 0 could not take {os.path.join(self.workdir, lock.LOCK_FILE)}: "
                                              "see its message")

    def _my_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The prompts of each step's global batch whose rows this process holds on the policy mesh (every prompt's
        G samples on one process), and those rows' global indices."""
        P, G = int(self.config.rollout.prompts_per_step), int(self.config.rollout.group_size)
        try:
            groups = multihost.local_groups(P * G, G, self.mesh)
        except ValueError as exc:
            raise config_lib.ConfigError(f"rollout.prompts_per_step={P} on {jax.process_count()} processes: {exc}") from None
        rows = (groups[:, None] * G + np.arange(G)).reshape(-1)
        if multihost.process_count() > 1:
            self._log(f"[train] process {jax.process_index()} of {jax.process_count()} samples prompts "
                      f"{_ranges(groups)} of each step's {P}")
        return groups, rows

    def _resume(self) -> None:
        """Restore the newest checkpoint that restores; broken newer ones are reported in one line and moved aside."""
        def usable(items: dict) -> None:  # a checkpoint whose meta cannot resume the run is as broken as a truncated one
            meta = items["meta"]
            int(meta["step"]), ckpt_lib.key_from_json(meta["rng"])
            self.source.restore(meta["data_state"])

        restored = self.checkpointer.restore_newest(self.trainer.params, self.trainer.opt_state, check=usable, log=self._log)
        if restored is None:
            return
        self.trainer.set_state(restored["params"], restored["opt_state"])
        meta = restored["meta"]
        if ckpt_lib.key_to_json(self.base_key) != list(meta["rng"]):
            self._log(f"[resume] note: the checkpoint's RNG key differs from seed {self.config.seed}; using the checkpoint's")
        self.base_key = ckpt_lib.key_from_json(meta["rng"])
        self.step = int(meta["step"])
        self._log(f"[resume] restored step {self.step} from {self.checkpointer.step_path(restored['step'])}")

    def save(self) -> None:
        """Checkpoint the current state (params, optimizer, step, RNG, data position)."""
        meta = {"step": self.step, "rng": ckpt_lib.key_to_json(self.base_key), "data_state": self.source.state(),
                "seed": int(self.config.seed)}
        self.checkpointer.save(self.step, self.trainer.params, self.trainer.opt_state, meta)

    def request_stop(self, *_: Any) -> None:
        """SIGTERM handler: finish the current step, checkpoint, exit cleanly."""
        self._stop_signal = True

    # -- one step

    def train_step(self) -> dict[str, float]:
        """Rollout -> verify -> steps -> critique -> update for one batch of prompts; returns host metrics (over every
        process's rows)."""
        cfg = self.config
        timer = PhaseTimer()
        step_key = jax.random.fold_in(self.base_key, self.step)
        rollout_key, update_key = jax.random.split(step_key)
        host_rng = np.random.default_rng([int(cfg.seed), self.step, 7])
        G = int(cfg.rollout.group_size)
        with timer("data"):
            examples = self.source.next_batch(int(cfg.rollout.prompts_per_step))
            examples = [examples[int(i)] for i in self.groups]  # this process's prompts
        with timer("rollout"):
            ro = rollout_phase(self.rollout_copy.refresh(self.model), self.tokenizer, examples, cfg, rollout_key,
                               self.mesh, self.stops, rules=self.rollout_copy.rules, prompt_index=self.groups)
        references = [ex.answer for ex in examples for _ in range(G)]
        with timer("verify"):
            outcome = verify_phase(ro.texts, references, cfg)
        with timer("steps"):
            steps = steps_phase(ro, self.tokenizer, cfg)
        total = int(cfg.rollout.prompts_per_step) * G
        with timer("critic"):
            crit = critique_phase(self.critic, ro, steps.steps, cfg, host_rng, outcome, self.rows, total)
        train_outcome = crit.outcome if crit.outcome is not None else outcome
        batch = assemble_batch(ro, steps.token_step, train_outcome, crit)
        with timer("update"):
            device_metrics = self.trainer.step(batch, update_key)
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        self.step += 1
        host, tokens, critic_tokens = self._host_metrics(ro, steps, outcome, train_outcome, crit, total)
        metrics.update(host)
        metrics.update(timer.metrics())
        sec = timer.seconds
        metrics["throughput/policy_tokens_per_s"] = tokens / max(sec.get("rollout", 0.0), 1e-9)
        metrics["throughput/critic_tokens_per_s"] = critic_tokens / max(sec.get("critic", 0.0), 1e-9)
        metrics["throughput/update_tokens_per_s"] = tokens * self.opts.ppo_epochs / max(sec.get("update", 0.0), 1e-9)
        return metrics

    def _host_metrics(self, ro: Rollout, steps: Any, outcome: np.ndarray, train_outcome: np.ndarray,
                      crit: CritiqueResult, total: int) -> tuple[dict[str, float], int, int]:
        """The rollout, step and critic metrics of the whole batch: each process's rows gathered (per-row values) or
        summed (counts), so process 0 reports every process's rows. Also the batch's response tokens and the critic's
        tokens (for the throughputs)."""
        rows = {"outcome": outcome, "train_outcome": train_outcome, "lengths": ro.lengths, "stopped": ro.stopped,
                "num_steps": np.array([len(s) for s in steps.steps], np.int32), "folded": np.asarray(steps.folded),
                "votes": crit.votes, "valid": crit.vote_valid}
        if crit.outcome is not None:
            rows["critic_outcome"] = crit.outcome
        g = multihost.gather_rows(rows, self.rows, total)
        counts = np.array([crit.failed_calls, crit.prompt_tokens, crit.generated_tokens], np.int64)
        if not crit.whole_batch and multihost.process_count() > 1:
            counts = np.sum(multihost.gather_blocks(counts.tolist(), self.mesh), axis=0)
        failed, prompt_tokens, generated = (int(c) for c in counts)
        requested = g["valid"].size if crit.requested else 0
        n_tokens = int(g["lengths"].sum())
        metrics = {
            "reward/outcome_accuracy": float(g["outcome"].mean()),
            "reward/train_outcome": float(g["train_outcome"].mean()),
            "rollout/response_len": float(g["lengths"].mean()),
            "rollout/response_len_max": float(g["lengths"].max()),
            "rollout/truncated_frac": float(1.0 - g["stopped"].mean()),
            "steps/per_response": float(g["num_steps"].mean()),
            "steps/folded_frac": float((g["folded"] > 0).mean()),
            "critic/parse_failure_rate": float(1.0 - g["valid"].sum() / requested) if requested else 0.0,
            "critic/agreement": critic_agreement(g["votes"], g["valid"], g["num_steps"]),
            "critic/failed_calls": float(failed),
            "critic/flagged_step_frac": flagged_step_fraction(g["votes"], g["valid"], g["num_steps"]),
            "critic/prompt_tokens": float(prompt_tokens),
            "critic/generated_tokens": float(generated),
            "optim/learning_rate": float(self.schedule(self.step * self.opts.updates_per_step - 1)),
        }
        if crit.outcome is not None:
            metrics["critic/outcome_agreement_with_verifier"] = float((g["critic_outcome"] == g["outcome"]).mean())
        return metrics, n_tokens, prompt_tokens + generated

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation of the arithmetic demo: sampled accuracy at the rollout temperature over
        eval.num_problems x eval.samples pairs, greedy accuracy, true wrong-step rates, standard errors."""
        cfg = self.config
        if cfg.data.source != "arithmetic":
            return {}
        from capo_jax.data.arithmetic import DEFAULT_TEMPLATE, ArithmeticWorld
        from capo_jax.demo.heldout import evaluate_world

        ev = cfg.eval
        temperature = float(cfg.rollout.temperature) if float(ev.temperature) < 0 else float(ev.temperature)
        out = evaluate_world(self.rollout_copy.refresh(self.model), self.tokenizer, ArithmeticWorld(cfg.data.world.to_dict()),
                             num_problems=int(ev.num_problems), samples=int(ev.samples), temperature=temperature,
                             max_new_tokens=int(ev.max_new_tokens) or int(cfg.rollout.max_new_tokens),
                             greedy=bool(ev.greedy), seed=int(cfg.seed), template=cfg.data.template or DEFAULT_TEMPLATE,
                             mesh=self.mesh, rules=self.rollout_copy.rules)
        return {f"eval/{k}": v for k, v in out.items()}

    # -- the loop

    def train(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> int:
        """Run to total_steps (or stop_after_steps, or SIGTERM); returns the last finished step. `on_step(step,
        metrics)` runs after each step's metrics are written, on every process (a notebook's live plot)."""
        cfg = self.config
        self._hold_lock()
        total = int(cfg.total_steps)
        stop_at = total if int(cfg.stop_after_steps) <= 0 else min(total, self.step + int(cfg.stop_after_steps))
        lg = cfg.logging
        lead = jax.process_index() == 0  # one host writes the logs
        # rows an interrupted run logged after the restored step are dropped (all of them when nothing was restored)
        self.writer = MetricsWriter(self.workdir, total_steps=total, initial_step=self.step,
                                    tensorboard=lead and bool(lg.tensorboard), jsonl=lead and bool(lg.jsonl),
                                    progress=lead and bool(lg.progress), stream=self._stream,
                                    keep_through=self.step if self.step > 0 else -1)
        previous = signal.signal(signal.SIGTERM, self.request_stop) if _main_thread() else None
        bad_in_a_row = 0
        stop = False
        try:
            if self.step >= total:
                self._log(f"[train] already at step {self.step} of {total}: nothing to do")
            elif self.step == 0 and int(cfg.eval.every) > 0 and (first := self.evaluate()):
                self.writer.write(0, first)  # the starting policy's level, the reference for every eval
            # every process leaves at the same step: a SIGTERM to any of them stops all (one small gather per step)
            while self.step < stop_at and not (stop := multihost.any_process(self._stop_signal)):
                metrics = self.train_step()
                skipped = metrics.get("train/skipped_updates", 0.0) > 0
                bad_in_a_row = bad_in_a_row + 1 if skipped else 0
                evaluated = {}
                if int(cfg.eval.every) > 0 and (self.step % int(cfg.eval.every) == 0 or self.step == total):
                    evaluated = self.evaluate()
                    metrics.update(evaluated)
                if self.step % int(lg.every) == 0 or self.step == stop_at or skipped or evaluated:  # eval rows always
                    self.writer.write(self.step, metrics)
                if on_step is not None:
                    on_step(self.step, metrics)
                if skipped:
                    self._log(f"[train] step {self.step}: {int(metrics['train/skipped_updates'])} update(s) skipped "
                              f"(non-finite loss, gradient or update); {bad_in_a_row} step(s) in a row")
                    if bad_in_a_row >= int(cfg.max_bad_steps):
                        raise StopTraining(f"{bad_in_a_row} consecutive steps with non-finite updates "
                                           f"(max_bad_steps={cfg.max_bad_steps}); stopping without a new checkpoint")
                if bad_in_a_row == 0 and (self.checkpointer.should_save(self.step) or self.step in (stop_at, total)):
                    self.save()
            if stop:
                who = "" if self._stop_signal else " (on another process)"
                self._log(f"[train] SIGTERM{who}: checkpointing step {self.step} and exiting")
                self.save()
            elif self.step >= total:
                self.finish()
        finally:
            self.checkpointer.close()
            self.writer.close()
            if self._lock is not None:
                self._lock.release()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self.step

    def finish(self) -> None:
        """End-of-run outputs the config asks for: a Hugging Face export of the policy (every process calls it, the
        weights are gathered, process 0 writes) and a PNG of the curves (process 0)."""
        cfg = self.config
        lead = multihost.is_lead()
        if bool(cfg.finish.export_hf):
            from capo_jax.models import save_pretrained

            out = os.path.join(self.workdir, "hf_export")
            save_pretrained(self.model, out, tokenizer_dir=os.path.join(self.workdir, ckpt_lib.POLICY_HF_DIR))
            from capo_jax.export import load_hint

            if lead:
                self._log(f"[train] policy exported as a Hugging Face folder: {out}; {load_hint(out)}")
        if bool(cfg.finish.plot) and lead:
            try:
                from capo_jax.demo.plot import plot_run

                self._log(f"[train] curves plotted: {plot_run(self.workdir)}")
            except Exception as exc:  # noqa: BLE001 - a plot never fails a finished run
                self._log(f"[train] could not plot the curves ({exc})")


def _placement(role: str, mesh: Any) -> str:
    """`policy on 2 devices (1 per process: 0, 1)`: where a role's mesh lives across processes."""
    per: dict[int, int] = {}
    for d in mesh.devices.flat:
        per[d.process_index] = per.get(d.process_index, 0) + 1
    counts = sorted(set(per.values()))
    each = f"{counts[0]} per process" if len(counts) == 1 else "unequal numbers per process"
    return f"{role} on {mesh.devices.size} devices ({each}: processes {_ranges(sorted(per))})"


def _ranges(values: Sequence[int]) -> str:
    """`0..3, 8..11` for [0, 1, 2, 3, 8, 9, 10, 11]."""
    out, start = [], None
    values = [int(v) for v in values]
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}..{v}" if v > start else f"{v}")
            start = None
    return ", ".join(out)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(config: ml_collections.ConfigDict, *, stream: Any = None) -> int:
    """Build a run from `config` and train it; returns the last finished step."""
    return Run(config, stream=stream).train()

