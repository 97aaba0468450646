"""Knowledge distillation: a smaller student trained on the training loop to match a frozen
teacher's next-token distributions.

The student shares the teacher's tokenizer, so the two distributions compare token by token. By
default it starts as half the teacher's blocks, evenly spaced with the first and last kept, with
the teacher's embeddings, final norm and head: the layer-dropping init of DistilBERT (every
other BERT layer), which starts far closer to the teacher than a random init. `student.model`
overrides of the shape (dim, heads, widths) need `student.init: random`; `student.base` starts
from any existing model that shares the tokenizer.

The loss per token (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"),
averaged over the tokens that have a target (padding and masked tokens weigh nothing):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

T^2 keeps the soft term's gradients the same size as T changes. `kl: reverse` takes
KL(student || teacher) instead, MiniLLM's mode-seeking choice for generative students. The
teacher's logits are computed on the fly for each micro-batch (no grad, eval mode) and never
stored: vocabulary x tokens would be gigabytes per epoch. The loss and its gradient with respect
to the student's logits are computed together, chunk by chunk, as model/loss.py does for
cross-entropy, so the [rows, vocab] temporaries stay one chunk large and only the gradient is
kept for the backward pass.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmforge.align.records import first_record
from llmforge.align.sft import encode_examples, is_validation, jsonl_examples, pad_batch
from llmforge.data.documents import document_batches
from llmforge.data.records import Rejected
from llmforge.data.sources import READERS, read_source
from llmforge.model.config import ModelConfig
from llmforge.model.loss import IGNORE_INDEX
from llmforge.model.transformer import Transformer
from llmforge.serve.chat_model import ChatModel, open_chat_model
from llmforge.train.device import autocast
from llmforge.train.loop import Objective, TrainConfig

KL_DIRECTIONS = ("forward", "reverse")
STUDENT_INITS = ("teacher", "random")
TEACHER_DTYPES = ("fp32", "bf16")
# Rows of [rows, vocab] logits the loss works on at once: a few fp32 temporaries of this size
# (about 50 MB each at SmolLM2's 49k vocabulary) live at a time.
LOSS_CHUNK_ROWS = 256
# Keys of a first JSONL record that make the file conversations rather than text.
_CONVERSATION_KEYS = ({"messages"}, {"prompt", "completion"}, {"question", "answer"})

Row = tuple[list[int], list[int]]  # (inputs, targets with -100 where no loss)


@dataclass
class StudentConfig:
    """How the student is made. It always shares the teacher's tokenizer."""

    # Teacher blocks (0-based, increasing) the student starts from, e.g. [0, 2, 4, 6]; empty =
    # n_layers of them, evenly spaced, the first and last kept.
    layers: list[int] = field(default_factory=list)
    n_layers: int = 0  # 0 = half the teacher's blocks, rounded up
    # teacher: the chosen blocks, embeddings, final norm and head copied from the teacher;
    # random: a fresh init (the only choice when `model` changes a weight's shape).
    init: str = "teacher"
    # ModelConfig fields that differ from the teacher's, e.g. {dim: 256, n_heads: 4}.
    model: dict = field(default_factory=dict)
    # Or a whole existing model (any spec `llmforge chat` opens) with the teacher's tokenizer.
    base: str = ""

    def __post_init__(self) -> None:
        if self.init not in STUDENT_INITS:
            raise ValueError(f"student.init must be one of {', '.join(STUDENT_INITS)}, "
                             f"got {self.init!r}")
        if self.n_layers < 0:
            raise ValueError(f"student.n_layers must be >= 0 (0 = half the teacher's), "
                             f"got {self.n_layers}")
        if self.layers:
            if min(self.layers) < 0 or self.layers != sorted(set(self.layers)):
                raise ValueError(f"student.layers must be distinct teacher block indices >= 0 "
                                 f"in increasing order, got {self.layers}")
            if self.n_layers and self.n_layers != len(self.layers):
                raise ValueError(f"student.n_layers={self.n_layers} but student.layers names "
                                 f"{len(self.layers)} blocks; set one of them")
            if self.init == "random":
                raise ValueError("student.layers picks teacher blocks to copy, and init: random "
                                 "copies none; give student.n_layers instead")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(f"student.model: unknown ModelConfig field(s) {', '.join(unknown)}")
        if "vocab_size" in self.model:
            raise ValueError("student.model.vocab_size: the student shares the teacher's "
                             "tokenizer, so its vocabulary is the teacher's")
        if "n_layers" in self.model:
            raise ValueError("student.model.n_layers: give student.n_layers or student.layers")
        if self.base and (self.layers or self.n_layers or self.model or self.init != "teacher"):
            raise ValueError("student.base is a whole model: leave student.layers, n_layers, "
                             "model and init unset")


def _distill_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=200, lr=1e-3, warmup_steps=20, batch_size=16, eval_every=50,
                       ckpt_every=100, eval_batches=4)


@dataclass
class DistillConfig:
    teacher: str = ""  # "" = the sft stage's model; else any model `llmforge chat` opens
    student: StudentConfig = field(default_factory=StudentConfig)
    # Text to distill on: "" = this run's own corpus (data/documents); else a source the data
    # stage reads (.txt, .jsonl with a "text" field, .parquet, a folder, a glob; one file of
    # another suffix, such as WikiText's .raw, is plain text), or a .jsonl of conversations
    # (messages, prompt/completion, GSM8K's question/answer) in the teacher's chat format,
    # distilled on the assistant's tokens only.
    data: str = ""
    max_rows: int = 0  # rows read (windows of train.seq_len tokens, or conversations); 0 = all
    val_fraction: float = 0.05  # rows held out, by a hash of the row's index or example id
    # T = 2 and alpha = 0.5 are the defaults of Hugging Face's DistilBERT / DistilGPT2 script
    # (transformers' research_projects/distillation: temperature 2.0, alpha_ce 0.5 with
    # alpha_clm 0.5). Hinton et al. found a lower weight on the hard targets best (alpha toward
    # 1); MiniLLM (reverse KL) and TRL's GKD (temperature 0.9, a JSD) keep no data term at all.
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy on the data
    kl: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    teacher_dtype: str = "fp32"  # bf16 halves the frozen teacher's memory
    train: TrainConfig = field(default_factory=_distill_train_defaults)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (the KL term's weight), got {self.alpha}")
        if self.kl not in KL_DIRECTIONS:
            raise ValueError(f"kl must be one of {', '.join(KL_DIRECTIONS)}, got {self.kl!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, "
                             f"got {self.teacher_dtype!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0 = all), got {self.max_rows}")


# --- the loss ---------------------------------------------------------------------------------


class _DistillLoss(torch.autograd.Function):
    """(loss, soft KL, CE) of [N, V] student and teacher logits and [N] targets; the gradient
    with respect to the student's logits is computed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, targets: Tensor, temperature: float,
                alpha: float, reverse: bool, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        t_ = temperature
        valid_all = targets != IGNORE_INDEX
        n = valid_all.sum().clamp_min(1)
        kl_sum = student.new_zeros((), dtype=torch.float32)
        ce_sum = student.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        for start in range(0, student.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            s, y, valid = student[rows].float(), targets[rows], valid_all[rows]
            log_q = F.log_softmax(s / t_, dim=-1)  # student at temperature T
            log_p = F.log_softmax(teacher[rows].float() / t_, dim=-1)
            log_ratio = log_q.sub(log_p)  # log q - log p
            q = log_q.exp_()
            if reverse:  # KL(q || p) = sum q (log q - log p)
                kl = (q * log_ratio).sum(-1)
            else:  # KL(p || q) = sum p (log p - log q)
                p = log_p.exp_()
                kl = -(p * log_ratio).sum(-1)
            log_s = F.log_softmax(s, dim=-1)
            safe = y.clamp_min(0)  # ignored rows gather a placeholder, then weigh zero
            ce = -log_s.gather(1, safe[:, None]).squeeze(1)
            kl_sum += (kl * valid).sum()
            ce_sum += (ce * valid).sum()
            if grad is None:
                continue
            # d(T^2 KL)/ds: forward T (q - p); reverse T q (log q - log p - KL).
            g = (q * (log_ratio - kl[:, None]) if reverse else q - p).mul_(alpha * t_)
            if alpha < 1:  # d CE/ds = softmax(s) - onehot(y)
                soft = log_s.exp_()
                soft[torch.arange(len(safe), device=soft.device), safe] -= 1
                g.add_(soft, alpha=1 - alpha)
            grad[rows] = g.mul_((valid / n)[:, None]).to(grad.dtype)
        loss = (alpha * t_ * t_ * kl_sum + (1 - alpha) * ce_sum) / n
        ctx.save_for_backward(grad)
        kl_mean, ce_mean = kl_sum / n, ce_sum / n
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _kl: Tensor, _ce: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *,
                 temperature: float = 2.0, alpha: float = 0.5, kl: str = "forward",
                 chunk_rows: int = LOSS_CHUNK_ROWS) -> tuple[Tensor, dict[str, float]]:
    """alpha * T^2 * KL + (1 - alpha) * CE per token, averaged over the tokens whose target is
    not -100; also the two terms' means as metrics (`soft_kl` at temperature T, `ce` at 1).

    Logits are [..., V] (the student's with grad, the teacher's without), targets [...] aligned
    with them. Gradients flow to the student's logits only."""
    if student_logits.shape != teacher_logits.shape or \
            targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"expected student and teacher logits [..., V] of one shape and targets "
                         f"[...], got {tuple(student_logits.shape)}, "
                         f"{tuple(teacher_logits.shape)}, {tuple(targets.shape)}")
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be one of {', '.join(KL_DIRECTIONS)}, got {kl!r}")
    vocab = student_logits.size(-1)
    loss, kl_mean, ce_mean = _DistillLoss.apply(
        student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab),
        targets.reshape(-1), float(temperature), float(alpha), kl == "reverse", chunk_rows)
    return loss, {"soft_kl": kl_mean.item(), "ce": ce_mean.item()}


def distill_objective(teacher: nn.Module, cfg: DistillConfig) -> Objective:
    """The loop's objective: the frozen teacher's logits for the micro-batch (no grad), then
    `distill_loss` against the student's."""
    def objective(forward: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        x, y, *doc_ids = batch
        docs = doc_ids[0] if doc_ids else None
        with torch.no_grad():
            teacher_logits = teacher(x, doc_ids=docs)
        return distill_loss(forward(x, doc_ids=docs), teacher_logits, y,
                            temperature=cfg.temperature, alpha=cfg.alpha, kl=cfg.kl)

    return objective


@torch.inference_mode()
def held_out(student: nn.Module, teacher: nn.Module, rows: list[Row], pad_id: int,
             cfg: DistillConfig) -> dict[str, float]:
    """Per-token means over held-out rows: the training objective (`loss`, `soft_kl` at T), the
    student's and the teacher's cross-entropy on the data, the student's forward KL to the
    teacher at temperature 1 (`kl`: how far the distributions a draft model samples are) and how
    often the two agree on the most likely token (`top1_agreement`)."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    keys = ("loss", "soft_kl", "kl", "ce", "teacher_ce", "top1_agreement")
    sums, tokens = dict.fromkeys(keys, 0.0), 0
    for start in range(0, len(rows), cfg.train.batch_size):
        x, y = (t.to(device) for t in pad_batch(rows[start : start + cfg.train.batch_size],
                                                pad_id))
        with autocast(device, cfg.train.dtype):
            s, t = student(x), teacher(x)
        n = (y != IGNORE_INDEX).sum().item()
        loss, trained = distill_loss(s, t, y, temperature=cfg.temperature, alpha=cfg.alpha,
                                     kl=cfg.kl)
        _, plain = distill_loss(s, t, y, temperature=1.0, alpha=1.0)
        _, own = distill_loss(t, t, y, temperature=1.0, alpha=0.0)
        agree = ((s.argmax(-1) == t.argmax(-1)) & (y != IGNORE_INDEX)).sum().item()
        for key, value in (("loss", loss.item()), ("soft_kl", trained["soft_kl"]),
                           ("kl", plain["soft_kl"]), ("ce", trained["ce"]),
                           ("teacher_ce", own["ce"]), ("top1_agreement", agree / max(n, 1))):
            sums[key] += value * n
        tokens += n
    student.train(was_training)
    return {**{k: v / max(tokens, 1) for k, v in sums.items()}, "tokens": tokens}


# --- the models -------------------------------------------------------------------------------


def spread_layers(n_teacher: int, n: int) -> list[int]:
    """`n` of `n_teacher` block indices, evenly spaced, the first and the last kept."""
    if not 1 <= n <= n_teacher:
        raise ValueError(f"student.n_layers={n}: the teacher has {n_teacher} blocks, so pick "
                         f"1 to {n_teacher}")
    if n == 1:
        return [0]
    return [int(i * (n_teacher - 1) / (n - 1) + 0.5) for i in range(n)]


def make_student(teacher: Transformer, cfg: StudentConfig, seed: int = 0) -> tuple[Transformer,
                                                                                 list[int] | None]:
    """A new student from the teacher's config (and cfg.model's changes), on its device; with
    init: teacher its blocks, embeddings, final norm and head are copies of the teacher's.
    Returns it and the teacher blocks it copied (None for a random init)."""
    n_teacher = teacher.cfg.n_layers
    out_of_range = [i for i in cfg.layers if i >= n_teacher]
    if out_of_range:
        raise ValueError(f"student.layers: {out_of_range} out of range; the teacher has "
                         f"{n_teacher} blocks (0 to {n_teacher - 1})")
    n = len(cfg.layers) or cfg.n_layers or (n_teacher + 1) // 2
    if cfg.init == "teacher":
        layers = list(cfg.layers) or spread_layers(n_teacher, n)
    else:
        layers = None
    student_cfg = dataclasses.replace(teacher.cfg, n_layers=n, **cfg.model)
    try:
        student_cfg.validate()
    except ValueError as e:
        raise ValueError(f"student.model: {e}") from None
    with torch.random.fork_rng(devices=[]):  # the same init on every run and rank
        torch.manual_seed(seed)
        student = Transformer(student_cfg)
    student.to(teacher.tok_emb.weight.device)
    if layers is not None:
        _copy_from_teacher(teacher, student, layers)
    return student, layers


def _copy_from_teacher(teacher: Transformer, student: Transformer, layers: list[int]) -> None:
    source, target = teacher.state_dict(), student.state_dict()
    picked: dict[str, Tensor] = {}
    missing = []
    for key, value in target.items():
        src = key
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            src = f"layers.{layers[int(index)]}.{rest}"
        if src in source and source[src].shape == value.shape:
            picked[key] = source[src].to(value.dtype)
        else:
            missing.append(key)
    kept_out = [k for k in source if not k.startswith("layers.") and k not in target]
    if missing or kept_out:
        names = ", ".join((missing + kept_out)[:3])
        raise ValueError(f"student.init=teacher copies the teacher's weights, but {names} "
                         f"differ between the two (student.model changes a shape, or the "
                         f"teacher's weights are quantized); use student.init: random")
    student.load_state_dict(picked)  # copies: the student's weights are its own


def same_tokenizer(teacher: ChatModel, student: ChatModel) -> None:
    """Raise unless the two models read and write the same token ids."""
    vocab_t = teacher.tokenizer.get_vocab(with_added_tokens=True)
    vocab_s = student.tokenizer.get_vocab(with_added_tokens=True)
    sizes = teacher.model.cfg.vocab_size, student.model.cfg.vocab_size
    if vocab_t != vocab_s or sizes[0] != sizes[1]:
        raise ValueError(f"student.base {student.name}: its tokenizer ({len(vocab_s)} tokens, "
                         f"{sizes[1]} logits) is not the teacher's ({len(vocab_t)} tokens, "
                         f"{sizes[0]} logits); distillation compares next-token "
                         f"distributions token by token, so both must share one")


def open_models(cfg: DistillConfig, spec: str, device: torch.device,
                seed: int = 0) -> tuple[ChatModel, ChatModel, dict]:
    """(frozen teacher, student ready to train, a summary of both). The student carries the
    teacher's tokenizer and chat format (its own with student.base), so it saves in the
    teacher's layout and serves as a draft model for it."""
    teacher = open_chat_model(spec, device=device)
    if cfg.student.base:
        student = open_chat_model(cfg.student.base, device=device)
        same_tokenizer(teacher, student)
        layers, init = None, "base"
    else:
        model, layers = make_student(teacher.model, cfg.student, seed)
        student = dataclasses.replace(teacher, model=model, name=f"{spec} (student)")
        init = cfg.student.init
    if teacher.model.cfg.vocab_size != student.model.cfg.vocab_size:
        raise ValueError("distill: student and teacher logits differ in size")
    teacher.model.requires_grad_(False).eval()
    if cfg.teacher_dtype == "bf16":  # after the student's copy, which stays fp32
        teacher.model.to(torch.bfloat16)
    if cfg.train.seq_len > min(teacher.model.cfg.max_seq_len, student.model.cfg.max_seq_len):
        raise ValueError(f"distill.train.seq_len={cfg.train.seq_len} exceeds the models' "
                         f"max_seq_len")
    student.model.train()
    params = {name: sum(p.numel() for p in chat.model.parameters())
              for name, chat in (("teacher", teacher), ("student", student))}
    return teacher, student, {
        "teacher": spec, "teacher_params": params["teacher"], "student_params": params["student"],
        "teacher_layers": teacher.model.cfg.n_layers, "student_layers": student.model.cfg.n_layers,
        "student_init": init, "copied_layers": layers,
    }


# --- the data ---------------------------------------------------------------------------------


def load_rows(cfg: DistillConfig, chat: ChatModel,
              documents: Path | None = None) -> tuple[list[Row], list[Row], Counter]:
    """(train rows, held-out rows, what was set aside) from cfg.data, or from `documents` (the
    run's corpus) when cfg.data is empty. Text becomes windows of train.seq_len tokens, each
    document opened by the model's prefix token as eval scores text; conversations become one
    padded row each, with targets on the assistant's tokens."""
    seq_len = cfg.train.seq_len
    if cfg.data and is_conversations(Path(cfg.data)):
        examples, skipped = jsonl_examples(Path(cfg.data), cfg.max_rows)
        held = [e for e in examples if is_validation(e.id, cfg.val_fraction)]
        kept = [e for e in examples if not is_validation(e.id, cfg.val_fraction)]
        train_rows, skipped_train = encode_examples(chat.format, kept, seq_len)
        val_rows, skipped_val = encode_examples(chat.format, held, seq_len)
        return train_rows, val_rows, skipped + skipped_train + skipped_val
    skipped: Counter = Counter()
    texts = _corpus_texts(documents) if not cfg.data else _source_texts(cfg.data, skipped)
    windows = text_windows(texts, chat, seq_len, cfg.max_rows)
    val = [is_validation(f"window:{i}", cfg.val_fraction) for i in range(len(windows))]
    return ([w for w, v in zip(windows, val, strict=True) if not v],
            [w for w, v in zip(windows, val, strict=True) if v], skipped)


def is_conversations(path: Path) -> bool:
    """True when the first record of a (possibly gzipped) JSONL file is a conversation."""
    if not path.is_file() or not path.name.endswith((".jsonl", ".jsonl.gz")):
        return False
    record = first_record(path)
    return isinstance(record, dict) and any(keys <= record.keys() for keys in _CONVERSATION_KEYS)


def text_windows(texts: Iterable[str], chat: ChatModel, seq_len: int,
                 max_rows: int = 0) -> list[Row]:
    """Non-overlapping (inputs, targets) windows of seq_len over the texts' tokens in order;
    reading stops once max_rows windows are there (0 = read everything)."""
    stream: list[int] = []
    enough = max_rows * seq_len + 1 if max_rows else None
    for batch in _batched(texts, 64):
        for encoding in chat.tokenizer.encode_batch(batch, add_special_tokens=False):
            stream.append(chat.prefix_id)
            stream.extend(encoding.ids)
        if enough and len(stream) >= enough:
            break
    n = max(0, (len(stream) - 1) // seq_len)
    n = min(n, max_rows) if max_rows else n
    return [(stream[i * seq_len : (i + 1) * seq_len], stream[i * seq_len + 1 : (i + 1) * seq_len
                                                             + 1]) for i in range(n)]


def _corpus_texts(documents: Path) -> Iterator[str]:
    for batch in document_batches(documents, ["text"]):
        yield from batch.column("text").to_pylist()


def _source_texts(source: str, skipped: Counter) -> Iterator[str]:
    path = Path(source)
    if path.is_file() and not path.name.lower().endswith(tuple(READERS)):
        try:  # a file named as no reader knows, such as WikiText's wiki.train.raw: plain text
            yield path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
        return
    for record in read_source(source):
        if isinstance(record, Rejected):
            skipped[record.reason] += 1
        elif record.text.strip():
            yield record.text


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
