"""GRPO: reinforcement learning with verifiable rewards, on the one training loop.

RL here is only a batch source and an objective, so checkpoints, resume, logging and DDP come
from train/loop.py unchanged. Each micro-batch is made on the fly: draw prompts, sample a group
of completions for each from the current weights with the serving engine, score them with a
verifier (or the user's reward function) and turn each group's rewards into advantages
(align/rewards.py); the objective then takes the clipped policy-gradient loss on them.

Samples are seeded by (seed, step, micro, prompt), and the engine is stepped in the caller's
thread with every request queued first, so its batches, and hence its tokens, depend only on
the requests: a resumed run redraws the very samples the uninterrupted one drew from the same
weights.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from llmforge.align.finetune import FinetuneConfig
from llmforge.align.lora import lora_layers
from llmforge.align.records import read_jsonl
from llmforge.align.rewards import (
    RewardFn,
    arithmetic_reward,
    extract_answer,
    group_advantages,
    grpo_loss,
    gsm8k_reward,
    load_reward_function,
)
from llmforge.align.sft import pad_batch
from llmforge.serve.engine import Engine
from llmforge.serve.outputs import RequestOutput
from llmforge.serve.sampling import MAX_N, SamplingParams
from llmforge.tokenizer.chat_format import ChatFormat
from llmforge.train.data import draw_indices
from llmforge.train.device import autocast
from llmforge.train.loop import Objective, TrainConfig

ARITHMETIC = "arithmetic"
ADVANTAGE_SCALES = ("std", "none")
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
IGNORE = -100  # targets outside the completion


def _grpo_train_defaults() -> TrainConfig:
    # RL moves a trained model a little: small constant lr, no decay of the weights.
    return TrainConfig(max_steps=200, lr=1e-5, min_lr_ratio=1.0, warmup_steps=10,
                       weight_decay=0.0, seq_len=512, eval_every=50, ckpt_every=50, log_every=1)


@dataclass
class GRPOConfig(FinetuneConfig):
    # "arithmetic" (synthetic "What is a + b?" tasks) or a JSONL file of {"prompt" or
    # "messages", "answer"} records; GSM8K's own {"question", "answer"} records work as they are.
    data: str = ARITHMETIC
    # "" = the task's verifier (arithmetic_reward, or gsm8k_reward for files); else
    # "file.py:function", a callable (prompt, completion, **record) -> float.
    reward: str = ""
    max_prompts: int = 0  # tasks to load; 0 = all
    val_prompts: int = 64  # the first tasks loaded, held out for evaluate_tasks
    max_operand: int = 20  # arithmetic: operands in [0, max_operand]
    operators: str = "+-"  # arithmetic: any of + - *
    group_size: int = 8  # completions sampled per prompt
    prompts_per_step: int = 8  # prompts per micro-batch, so group_size x this rows
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO's clip-higher; None = clip_eps
    kl_coef: float = 0.0  # weight of the k3 KL to the reference model
    advantage_scale: str = "std"  # "std" (GRPO) or "none" (Dr. GRPO)
    token_level: bool = True  # average over all tokens (DAPO), else per sequence first (GRPO)
    # train.batch_size is unused: a micro-batch is prompts_per_step x group_size rows, and
    # train.seq_len bounds prompt + completion.
    train: TrainConfig = field(default_factory=_grpo_train_defaults)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_step", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompts", "val_prompts", "max_operand", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 2 <= self.group_size <= MAX_N:
            raise ValueError(f"GRPOConfig.group_size must be in [2, {MAX_N}], "
                             f"got {self.group_size}")
        if not self.operators or set(self.operators) - OPERATORS.keys():
            raise ValueError(f"GRPOConfig.operators must be some of {''.join(OPERATORS)}, "
                             f"got {self.operators!r}")
        if not 0 < self.temperature <= 2:
            raise ValueError(f"GRPOConfig.temperature must be in (0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GRPOConfig.top_p must be in (0, 1], got {self.top_p}")
        if not self.clip_eps > 0 or (self.clip_eps_high is not None and
                                     not self.clip_eps_high > 0):
            raise ValueError(f"GRPOConfig.clip_eps and clip_eps_high must be > 0, got "
                             f"{self.clip_eps}, {self.clip_eps_high}")
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise ValueError(f"GRPOConfig.advantage_scale must be one of "
                             f"{', '.join(ADVANTAGE_SCALES)}, got {self.advantage_scale!r}")
        if self.reward and not all(self.reward.rpartition(":")[::2]):
            raise ValueError(f"GRPOConfig.reward must be '' or 'file.py:function', "
                             f"got {self.reward!r}")
        if self.train.spike_factor:
            raise ValueError("GRPOConfig.train.spike_factor must be 0: a policy-gradient loss "
                             "hovers around 0, so a multiple of its mean is no spike test")
        if self.train.parallel != "ddp":
            raise ValueError("GRPOConfig.train.parallel must be 'ddp': the engine samples from "
                             "the whole, unsharded model")


@dataclass
class Task:
    id: str
    messages: list[dict]  # the conversation to answer, ending with the question
    answer: str  # the reference the reward checks against


Reward = Callable[[Task, str], float]  # (task, completion text) -> reward


def load_tasks(cfg: GRPOConfig, seed: int = 0) -> tuple[list[Task], Counter]:
    """The tasks `cfg.data` names (synthetic ones in an order shuffled by `seed`), and the
    records set aside by reason."""
    if cfg.data == ARITHMETIC:
        tasks, skipped = arithmetic_tasks(cfg.max_prompts, cfg.max_operand, cfg.operators,
                                          seed), Counter()
    else:
        tasks, skipped = jsonl_tasks(Path(cfg.data), cfg.max_prompts,
                                     need_number=not cfg.reward)
    if not tasks:
        raise ValueError(f"grpo: no usable tasks in {cfg.data} (set aside: {dict(skipped)})")
    return tasks, skipped


def arithmetic_tasks(n: int, max_operand: int, operators: str, seed: int) -> list[Task]:
    """`n` distinct "What is a <op> b?" tasks, operands in [0, max_operand], in an order shuffled
    by `seed`; all of them when n is 0 or more than there are."""
    side = max_operand + 1
    total = len(operators) * side * side
    tasks = []
    for k in np.random.default_rng(seed).permutation(total)[: n or total].tolist():
        op, rest = divmod(k, side * side)
        a, b = divmod(rest, side)
        symbol = operators[op]
        tasks.append(Task(f"{a}{symbol}{b}",
                          [{"role": "user", "content": f"What is {a} {symbol} {b}?"}],
                          str(OPERATORS[symbol](a, b))))
    return tasks


def jsonl_tasks(path: Path, max_tasks: int = 0,
                need_number: bool = True) -> tuple[list[Task], Counter]:
    """Tasks from JSONL records; bad ones are counted by reason, never fatal. `need_number`
    (the default verifiers) also sets aside answers with no number to check against."""
    if not path.is_file():
        raise FileNotFoundError(f"grpo.data: no such file: {path}")
    tasks: list[Task] = []
    skipped: Counter = Counter()
    for task_id, record in read_jsonl(path, skipped):
        task = _task(task_id, record, need_number, skipped)
        if task is not None:
            tasks.append(task)
            if max_tasks and len(tasks) >= max_tasks:
                break
    return tasks, skipped


def _task(task_id: str, record: dict, need_number: bool, skipped: Counter) -> Task | None:
    """One record as a Task, or None with the reason counted in `skipped`."""
    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) for m in messages)):
            skipped["bad_messages"] += 1
            return None
    else:
        prompt = record.get("prompt", record.get("question"))
        if not isinstance(prompt, str) or not prompt.strip():
            skipped["missing_prompt"] += 1
            return None
        messages = [{"role": "user", "content": prompt}]
    answer = record.get("answer")
    if answer is None:
        skipped["missing_answer"] += 1
        return None
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        skipped["bad_answer"] += 1
        return None
    answer = str(answer).strip()
    if not answer:
        skipped["empty_answer"] += 1
        return None
    if need_number and extract_answer(answer) is None:
        skipped["no_number_in_answer"] += 1
        return None
    return Task(task_id, messages, answer)


def split_tasks(tasks: list[Task], val_prompts: int) -> tuple[list[Task], list[Task]]:
    """(train, held out): the first `val_prompts` tasks are held out."""
    if val_prompts >= len(tasks):
        raise ValueError(f"grpo: val_prompts={val_prompts} leaves none of the {len(tasks)} "
                         f"tasks to train on")
    return tasks[val_prompts:], tasks[:val_prompts]


def task_reward(cfg: GRPOConfig) -> Reward:
    """The reward `cfg.reward` names, or the verifier of `cfg.data`'s tasks."""
    if cfg.reward:
        return user_reward(load_reward_function(cfg.reward))
    if cfg.data == ARITHMETIC:
        return lambda task, completion: arithmetic_reward(completion, float(task.answer))
    return lambda task, completion: gsm8k_reward(completion, task.answer)


def user_reward(fn: RewardFn) -> Reward:
    """A user function as a Reward: prompt = the task's last message, record = its answer, id
    and messages. `fn` keeps counting its errors."""
    def reward(task: Task, completion: str) -> float:
        return fn(task.messages[-1].get("content", ""), completion, answer=task.answer,
                  id=task.id, messages=task.messages)

    return reward


def encode_prompts(chat: ChatFormat, tasks: list[Task],
                   max_len: int) -> tuple[list[Task], list[list[int]], Counter]:
    """(kept tasks, their prompt ids, set aside by reason): a bad message or a prompt longer
    than `max_len` tokens."""
    kept, prompts, skipped = [], [], Counter()
    for task in tasks:
        try:
            ids = chat.prompt(task.messages)
        except ValueError:
            skipped["bad_message"] += 1
            continue
        if len(ids) > max_len:
            skipped["prompt_too_long"] += 1
            continue
        kept.append(task)
        prompts.append(ids)
    return kept, prompts, skipped


def per_token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[target] at each position [B, T] in float32; 0 where
    the target is -100."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(targets != IGNORE, logps, torch.zeros_like(logps))


def completion_row(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, targets) of prompt + completion: only the completion's tokens, a final stop
    token included, are targets."""
    ids = prompt + completion
    return ids[:-1], [IGNORE] * (len(prompt) - 1) + completion


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """model.eval() inside, its own training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model as its base computes it: every LoRA update scaled by 0 inside."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise ValueError("cannot switch merged LoRA adapters off; unmerge them first")
    scalings = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield
    finally:
        for layer, scaling in zip(layers, scalings, strict=True):
            layer.scaling = scaling


def generate(engine: Engine, prompts: Sequence[list[int]],
             params: Sequence[SamplingParams]) -> list[RequestOutput]:
    """Queue every request, then step the engine in this thread until all have finished, so
    the batches it forms, and its outputs, depend on nothing but the requests."""
    handles = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while not all(h.done for h in handles):
        engine.step()
    return [h.result() for h in handles]


def _engine(model: nn.Module, tokenizer: Tokenizer, stop_ids: Sequence[int],
            prompts: list[list[int]], max_new_tokens: int, max_num_seqs: int,
            prefix_cache_slots: int) -> Engine:
    """An engine with room for `max_num_seqs` sequences of the longest prompt plus its reply;
    the model's training mode is left as it was."""
    with evaluating(model):
        return Engine(model, tokenizer, stop_ids=stop_ids, max_num_seqs=max_num_seqs,
                      max_model_len=max(map(len, prompts)) + max_new_tokens,
                      prefix_cache_slots=prefix_cache_slots, max_waiting=len(prompts))


class GRPOBatches:
    """Micro-batch (step, micro): prompts_per_step tasks drawn by a seeded RNG, group_size
    completions of each sampled from the model's current weights and scored, as

        (inputs [N, T], targets [N, T] (-100 outside the completions), old log-probs [N, T],
         advantages [N], rewards [N][, reference log-probs [N, T] when kl_coef > 0])

    with N = prompts_per_step x group_size rows, prompt-major. Log-probs are of the policy at
    the sampling temperature (top_p's truncation is not modelled), under the training dtype.
    The reference is `reference` (a frozen model) or, when it is None and the policy has LoRA
    adapters, the policy with its adapters switched off: the model it started from, at no
    memory cost. Build this after the model is on its device: the engine's cache lives there.
    """

    def __init__(self, model: nn.Module, chat_format: ChatFormat, tokenizer: Tokenizer,
                 stop_ids: Sequence[int], tasks: list[Task], reward_fn: Reward, cfg: GRPOConfig,
                 seed: int, *, rank: int = 0, world_size: int = 1,
                 reference: nn.Module | None = None):
        if cfg.kl_coef and reference is None and not lora_layers(model):
            raise ValueError("kl_coef > 0 needs a reference model, or LoRA adapters on the "
                             "policy (switched off, they give the reference)")
        max_prompt = min(cfg.train.seq_len, model.cfg.max_seq_len) - cfg.max_new_tokens
        self.tasks, self.prompts, self.skipped = encode_prompts(chat_format, tasks, max_prompt)
        if not self.tasks:
            raise ValueError(f"grpo: no prompt fits in {max_prompt} tokens "
                             f"(set aside: {dict(self.skipped)})")
        self.model, self.reward_fn, self.cfg, self.seed = model, reward_fn, cfg, seed
        self.reference = reference
        self.rank, self.world_size = rank, world_size
        self.device = next(model.parameters()).device
        self.pad_id = stop_ids[0]
        # No prefix pool: it would hold keys and values computed by earlier weights.
        self.engine = _engine(model, tokenizer, stop_ids, self.prompts, cfg.max_new_tokens,
                              cfg.prompts_per_step * cfg.group_size, prefix_cache_slots=0)

    def __call__(self, step: int, micro: int) -> tuple[Tensor, ...]:
        cfg = self.cfg
        picked = draw_indices(self.seed, step, micro, len(self.tasks), cfg.prompts_per_step,
                              self.rank, self.world_size).tolist()
        first = self.rank * cfg.prompts_per_step  # this rank's place in the global batch
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, n=cfg.group_size,
                                 seed=request_seed(self.seed, step, micro, first + i))
                  for i in range(len(picked))]
        with evaluating(self.model):
            outputs = generate(self.engine, [self.prompts[i] for i in picked], params)
        rows, rewards = [], []
        for i, output in zip(picked, outputs, strict=True):
            for choice in output.choices:
                rows.append(completion_row(self.prompts[i], choice.token_ids))
                rewards.append(self.reward_fn(self.tasks[i], choice.text))
        x, y = (t.to(self.device) for t in pad_batch(rows, self.pad_id))
        rewards = torch.tensor(rewards, dtype=torch.float32)
        advantages, _ = group_advantages(rewards, cfg.group_size, scale=cfg.advantage_scale)
        batch = (x, y, self._logprobs(self.model, x, y), advantages.flatten(), rewards)
        if not cfg.kl_coef:
            return batch
        if self.reference is not None:
            return (*batch, self._logprobs(self.reference, x, y))
        with adapters_off(self.model):
            return (*batch, self._logprobs(self.model, x, y))

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with evaluating(model), autocast(self.device, self.cfg.train.dtype):
            return per_token_logprobs(model(x), y, self.cfg.temperature)


def request_seed(seed: int, step: int, micro: int, index: int) -> int:
    """The sampling seed of prompt `index` of micro-batch (step, micro); its group's choices
    use this + 0 .. group_size - 1."""
    return int(np.random.default_rng([seed, step, micro, index]).integers(2**62))


def grpo_objective(cfg: GRPOConfig) -> Objective:
    """The loop's objective for GRPOBatches: `grpo_loss` on the policy's token log-probs, with
    the batch's reward, zero-variance fraction and completion length logged beside it."""
    def objective(forward: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        x, y, logp_old, advantages, rewards, *reference = batch
        mask = y != IGNORE
        loss, metrics = grpo_loss(
            per_token_logprobs(forward(x), y, cfg.temperature), logp_old, advantages, mask,
            clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
            logp_ref=reference[0] if reference else None, kl_coef=cfg.kl_coef,
            token_level=cfg.token_level)
        _, zero_variance = group_advantages(rewards, cfg.group_size)
        return loss, {"reward": rewards.mean().item(), "zero_variance": zero_variance,
                      "completion_length": mask.sum(1).float().mean().item(), **metrics}

    return objective


@torch.inference_mode()
def evaluate_tasks(model: nn.Module, chat_format: ChatFormat, tokenizer: Tokenizer,
                   stop_ids: Sequence[int], tasks: list[Task], reward_fn: Reward,
                   max_new_tokens: int) -> dict[str, float]:
    """Greedy completions of `tasks` scored by `reward_fn`: mean reward, accuracy (the fraction
    scoring at least 1, a verifier's "right"), mean completion tokens and the tasks scored
    (those whose prompt fits the model)."""
    kept, prompts, _ = encode_prompts(chat_format, tasks, model.cfg.max_seq_len - max_new_tokens)
    if not kept:
        raise ValueError("evaluate_tasks: no task's prompt fits the model's context")
    greedy = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    with evaluating(model):
        engine = _engine(model, tokenizer, stop_ids, prompts, max_new_tokens,
                         min(32, len(kept)), prefix_cache_slots=8)
        outputs = generate(engine, prompts, [greedy] * len(prompts))
    rewards = [reward_fn(task, out.choices[0].text) for task, out in zip(kept, outputs,
                                                                          strict=True)]
    return {"reward": sum(rewards) / len(rewards),
            "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
            "completion_length": sum(len(o.choices[0].token_ids) for o in outputs) / len(outputs),
            "tasks": len(kept)}
