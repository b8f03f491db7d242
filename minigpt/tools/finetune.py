"""Recovery fine-tuning: full fine-tuning of a (pruned) model on its domain with ``transformers.Trainer``.

Training sequences stream from the domain corpus (``data.Batches``, packed, no padding), cycled over a
fine-tuning set of ``train_tokens`` (default: the whole corpus), at most ``train_doc_tokens`` of each document
(default: all). Every ``eval_every`` optimiser steps the held-out
perplexity (``evaluation.perplexity``) is measured; training stops when it is at or below ``target``, when it
over-fits (held-out perplexity rose at each of the last ``patience`` evaluations while the mean training loss
fell), when it stalls (none of the last ``patience`` evaluations beat the best before them), or after
``max_steps``. The model ends with the weights of its best evaluation.

With a ``teacher`` (the unpruned model) the loss is knowledge distillation mixed with the language-model loss,
``(1 - α)·CE(labels) + α·τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ))`` per predicted token: the teacher's
whole next-token distribution is a richer signal than the one observed token, so recovery needs fewer steps.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import tempfile
import time

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline.data import Batches, resolve_files
from minigpt.pipeline.evaluation import perplexity

log = logging.getLogger("minigpt")


class TokenStream(torch.utils.data.IterableDataset):
    """Endless packed training sequences ``{"input_ids": (S,), "labels": (S,)}``, restarting at each pass.

    Each pass yields every sequence of the fine-tuning set once, in a seeded random order within a buffer of
    ``shuffle_buffer`` sequences (consecutive sequences of one file would otherwise fill whole batches).
    ``doc_tokens``: at most that many tokens of each document (a seeded window), so that the buffer, and a short
    run, spans many documents instead of a few long ones.
    ``pass_tokens``: tokens in one pass, known once a pass has completed (or from ``max_tokens``).
    """

    def __init__(self, tokenizer, files, seq_len: int, max_tokens: int | None, seed: int = 0,
                 shuffle_buffer: int = 256, doc_tokens: int | None = None):
        self.batches = Batches(tokenizer, files, seq_len=seq_len, batch_size=1, max_tokens=max_tokens, seed=seed,
                               doc_tokens=doc_tokens)
        self.pass_tokens = None if max_tokens is None else self.batches.max_sequences * seq_len
        self.shuffle_buffer, self.rng = max(1, shuffle_buffer), random.Random(seed)

    def _shuffled(self, sequences):
        buffer = []
        for seq in sequences:
            buffer.append(seq)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(self.rng.randrange(len(buffer)))
        self.rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        while True:
            n = 0
            for seq in self._shuffled(self.batches.sequences()):
                n += 1
                ids = torch.tensor(seq, dtype=torch.long)
                yield {"input_ids": ids, "labels": ids}
            self.pass_tokens = n * self.batches.seq_len


def overfitting(history: list[dict], patience: int) -> bool:
    """True when each of the last ``patience`` evaluations raised perplexity while the training loss fell."""
    trained = [h for h in history if h.get("train_loss") is not None]
    if patience < 1 or len(trained) < patience + 1:
        return False
    tail = trained[-(patience + 1):]
    return all(b["perplexity"] > a["perplexity"] and b["train_loss"] < a["train_loss"] for a, b in itertools.pairwise(tail))


def stalled(history: list[dict], patience: int) -> bool:
    """True when none of the last ``patience`` evaluations beat the best perplexity before them."""
    if patience < 1 or len(history) < patience + 1:
        return False
    return min(h["perplexity"] for h in history[-patience:]) >= min(h["perplexity"] for h in history[:-patience])


def distillation_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float):
    """``(1 - α)·CE + α·τ²·KL(teacher ‖ student)``, both averaged over the predicted tokens.

    ``student_logits``/``teacher_logits``: (B, S, V); ``labels``: (B, S), positions 1.. are the targets of 0..S-2
    (Hugging Face causal-LM convention, -100 ignored).
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    mask = targets != -100
    student = student_logits[:, :-1][mask].float()  # (N, V)
    log_p = F.log_softmax(student, -1)
    ce = F.nll_loss(log_p, targets[mask])
    if alpha == 0:
        return ce
    if temperature != 1:
        log_p = F.log_softmax(student / temperature, -1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, -1)
    kl = F.kl_div(log_p, teacher, log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def _distillation_trainer(teacher, alpha: float, temperature: float):
    """A ``Trainer`` class whose loss is ``distillation_loss`` against ``teacher`` (run in eval mode, no grad)."""
    from transformers import Trainer

    teacher.eval()

    class DistillationTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"])
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs["input_ids"]).logits
            loss = distillation_loss(outputs.logits, teacher_logits, labels, alpha, temperature)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def _recovery_callback(evaluate, target, eval_every, patience, tokens_per_step, history, best, progress):
    """A ``TrainerCallback`` that evaluates on a schedule and stops on target, over-fitting (see module doc)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Recovery(TrainerCallback):
        def __init__(self):
            self.losses: list[float] = []  # training losses since the last evaluation
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, unit="step", desc="fine-tuning", disable=not progress)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if logs is None or "loss" not in logs:
                return control
            self.losses.append(float(logs["loss"]))
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}", ppl=f"{history[-1]['perplexity']:.2f}")
            if state.global_step % eval_every and state.global_step < state.max_steps:
                return control
            entry = {"step": state.global_step, "tokens": state.global_step * tokens_per_step,
                     "train_loss": sum(self.losses) / len(self.losses), **evaluate(model)}
            self.losses.clear()
            history.append(entry)
            log.info("step %d: held-out perplexity %.3f, train loss %.4f", entry["step"], entry["perplexity"],
                     entry["train_loss"])
            if entry["perplexity"] < best.get("perplexity", math.inf):
                best.update(entry, state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            reached = target is not None and entry["perplexity"] <= target
            stop = ("target" if reached else "overfitting" if overfitting(history, patience)
                    else "stalled" if stalled(history, patience) else None)
            if stop:
                control.should_training_stop = True
                entry["stop"] = stop
            return control

    return Recovery()


def finetune(
    model,
    tokenizer,
    data="stdlib",
    eval_data=None,
    *,
    target: float | None = None,
    max_steps: int = 200,
    eval_every: int = 10,
    seq_len: int = 256,
    batch_size: int = 4,
    grad_accum: int = 1,
    train_tokens: int | None = None,
    train_doc_tokens: int | None = None,
    learning_rate: float = 5e-5,
    warmup_steps: int = 5,
    weight_decay: float = 0.0,
    lr_scheduler: str = "constant_with_warmup",
    teacher=None,
    distill_alpha: float = 0.5,
    distill_temperature: float = 1.0,
    eval_tokens: int = 4096,
    eval_seq_len: int = 512,
    eval_doc_tokens: int | None = None,
    patience: int = 2,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune ``model`` (all parameters, in place) on ``data`` until held-out perplexity reaches ``target``.

    ``eval_data``: held-out corpus (default ``<data>-heldout`` for a built-in corpus name). ``bf16``: mixed
    precision (default: on CUDA). ``lr_scheduler``: a ``transformers`` schedule name (``cosine`` decays to 0 at
    ``max_steps``). ``teacher``: distil from this model (same vocabulary) with weight ``distill_alpha`` and
    temperature ``distill_temperature`` (see module doc). Returns a report: ``recovered``, ``stop`` (target /
    overfitting / stalled / max_steps), ``steps``, ``tokens``, ``epochs`` (passes over the fine-tuning set), the
    evaluation ``history`` and the ``settings``.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if max_steps < 1 or eval_every < 1:
        raise MiniGPTError(f"max_steps and eval_every must be ≥ 1 (got {max_steps}, {eval_every})")
    if not 0 <= distill_alpha <= 1 or distill_temperature <= 0:
        raise MiniGPTError(f"distill_alpha must be in [0, 1] and distill_temperature > 0 "
                           f"(got {distill_alpha}, {distill_temperature})")
    if teacher is not None:
        predicts, teaches = (m.get_output_embeddings().weight.shape[0] for m in (model, teacher))
        if predicts != teaches:
            raise MiniGPTError(f"distillation needs the teacher's vocabulary: the model predicts {predicts} tokens, "
                               f"the teacher {teaches} (vocabulary-pruned models cannot distil)")
    files = resolve_files(data)
    if eval_data is None:
        name = data if isinstance(data, str) else None
        eval_data = f"{name}-heldout" if name and "/" not in name and not name.endswith("-heldout") else None
        if eval_data is None:
            raise MiniGPTError("give eval_data: held-out text to measure recovery on")
    cuda = model.get_input_embeddings().weight.device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16

    def evaluate(m) -> dict:
        was_training = m.training
        m.eval()
        r = perplexity(m, tokenizer, eval_data, seq_len=eval_seq_len, max_tokens=eval_tokens,
                       doc_tokens=eval_doc_tokens)
        m.train(was_training)
        return {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"]}

    tokens_per_step = batch_size * grad_accum * seq_len
    history: list[dict] = [{"step": 0, "tokens": 0, "train_loss": None, **evaluate(model)}]
    best: dict = {}
    start = time.perf_counter()
    stream = TokenStream(tokenizer, files, seq_len, train_tokens, seed, doc_tokens=train_doc_tokens)
    if target is None or history[0]["perplexity"] > target:
        with tempfile.TemporaryDirectory(prefix="minigpt-finetune-") as tmp:
            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                max_steps=max_steps, learning_rate=learning_rate, lr_scheduler_type=lr_scheduler,
                warmup_steps=warmup_steps, weight_decay=weight_decay, logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", bf16=bf16, use_cpu=not cuda, seed=seed,
                activation_checkpointing=gradient_checkpointing, disable_tqdm=True,
                dataloader_num_workers=0, remove_unused_columns=False,
            )
            callback = _recovery_callback(evaluate, target, eval_every, patience, tokens_per_step, history, best,
                                          progress)
            trainer_class = Trainer if teacher is None else _distillation_trainer(teacher, distill_alpha,
                                                                                  distill_temperature)
            trainer = trainer_class(model=model, args=args, train_dataset=stream,
                                    data_collator=default_data_collator, callbacks=[callback])
            for printer in (PrinterCallback, ProgressCallback):  # our callback shows progress, not every log
                trainer.remove_callback(printer)
            trainer.train()
        if best and best["perplexity"] < history[-1]["perplexity"]:  # over-fitted, stalled or worse at the end
            model.load_state_dict(best["state"])
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
    model.eval()
    last = history[-1]
    final = best if best and best["perplexity"] < last["perplexity"] else last
    steps = last["step"]
    return {
        "recovered": target is not None and final["perplexity"] <= target,
        "stop": last.get("stop", "target" if steps == 0 and target is not None else "max_steps"),
        "target": target,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "epochs": steps * tokens_per_step / stream.pass_tokens if stream.pass_tokens else None,
        "train_set_tokens": stream.pass_tokens,
        "perplexity_before": history[0]["perplexity"],
        "perplexity_after": final["perplexity"],
        "bits_per_byte_after": final["bits_per_byte"],
        "seconds": round(time.perf_counter() - start, 1),
        "history": history,
        "settings": {"seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
                     "learning_rate": learning_rate, "lr_scheduler": lr_scheduler, "max_steps": max_steps,
                     "eval_every": eval_every, "eval_tokens": eval_tokens, "eval_doc_tokens": eval_doc_tokens,
                     "train_tokens": train_tokens, "train_doc_tokens": train_doc_tokens,
                     "bf16": bf16, "distill": teacher is not None,
                     **({"distill_alpha": distill_alpha, "distill_temperature": distill_temperature}
                        if teacher is not None else {})},
    }
