"""What a run prints: its configuration at the start, one line per logged step, and the summary at
the end (also written to <out>/summary.json), with a few test problems' completions.
"""
import json
import os

from data import answer_of
from dpop import LOSSES
from extras.config import has_stop_rule
from extras.files import write_atomically


def print_config(cfg, model, device, dtype, world, global_batch):
    """The run's configuration in a few lines: the model that trains (with --init, the
    checkpoint's shape, not the flags' defaults) and where it starts from, the stage's recipe
    (its loss's knobs, and the reference: a frozen copy of the starting model, or none), the
    machine."""
    c = model.config
    start = f"from {cfg.init}" if cfg.init else "from random weights"
    print(f"model: {c.n_layer} blocks x {c.n_head} heads, width {c.n_embd}, context {c.block_size}, "
          f"vocabulary {c.vocab_size}: {model.num_params() / 1e6:.2f}M parameters, {start}")
    knobs = LOSSES[cfg.loss].knobs if cfg.loss in LOSSES else {}  # shown when set, or set off its default
    recipe = ", ".join([f"loss {cfg.loss}"] + [f"{k} {getattr(cfg, k)}" for k, default in knobs.items()
                                               if getattr(cfg, k) or getattr(cfg, k) != default])
    print(f"training: {recipe}; {cfg.steps} steps of {global_batch} pairs "
          f"(batch {cfg.batch_size} x grad accum {cfg.grad_accum} x {world} process{'es' * (world > 1)}); lr {cfg.lr:g} "
          f"(warm-up {cfg.warmup:.0%} of the steps, cosine to {cfg.min_lr_ratio:g} x); seed {cfg.seed}")
    if cfg.loss in LOSSES:
        print(f"reference: the starting model, frozen (--ref-logps {cfg.ref_logps})" if LOSSES[cfg.loss].reference else
              f"reference: none (--loss {cfg.loss} compares the policy with no other model)")
    if has_stop_rule(vars(cfg)):
        print(f"stop rule: at {cfg.sft_target_acc:.0%} greedy accuracy on the eval problems, checked every "
              f"{cfg.sft_check_every} steps (--sft-target-acc, --sft-check-every)")
    print(f"machine: {device}, {str(dtype).removeprefix('torch.')}; output {cfg.out}")


def format_row(row, shown=()):
    """One log line of train.py's loop: the failure DPOP targets (dchosen, the chosen log-prob's
    change from the reference, going negative) stays in view. shown: the loss's own terms to show
    too (dpop.LOSSES[loss].shown), each by the name after its "/"."""
    line = f"step {row['step']:4d} | loss {row['loss']:.4f}"
    if "rewards/margins" in row:
        line += f" | margin {row['rewards/margins']:+.3f} | acc {row['rewards/accuracies']:.2f}"
    if "logratio/chosen" in row:  # a loss with a reference
        line += (f" | dchosen {row['logratio/chosen']:+.2f} | drejected {row['logratio/rejected']:+.2f}"
                 f" | chosen<ref {row['penalty/active']:.2f}")
    for name in shown:  # RPO: its NLL term
        line += f" | {name.split('/')[-1]} {row[name]:.3f}"
    return line + (f" | gnorm {row['grad_norm']:.2f} | lr {row['lr']:.1e}"
                   f" | {row['tokens_per_s']:.0f} tok/s | util {row['util']:.0%}")


def summarize(cfg, trained, start_test, start_eval_logps, eval_pairs, problems, texts):
    """train.py's summary, returned and written to <out>/summary.json (whole or not at all): the
    trained model's held-out figures and, after --init, the starting model's accuracy on the test
    problems (start_test: its (accuracy, completions), or (None, None)); printed as a small table,
    starting model vs trained, with the first three test problems' completions of both models.
    (summary.json keeps the starting model's figures under "reference", the name they have had
    since the two models were always the same.)"""
    summary = {"trained": trained}
    if cfg.init:  # none where the answers are unknown
        summary["reference"] = {} if start_test[0] is None else {"gen_accuracy": start_test[0]}
    start_texts = start_test[1]
    write_atomically(os.path.join(cfg.out, "summary.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    trained, n_pairs, n_problems = summary["trained"], len(eval_pairs), len(problems)
    print(f"--- summary ({cfg.loss}; held-out: {n_pairs} eval pairs" +
          (f", {n_problems} test problems)" if n_problems else ")"))
    if "gen_accuracy" in trained:
        start_acc = summary.get("reference", {}).get("gen_accuracy")
        start_txt = "     -" if start_acc is None else f"{start_acc:6.1%}"
        print(f"  generation accuracy        start {start_txt}   trained {trained['gen_accuracy']:6.1%}"
              f"   (greedy, on the {n_problems} test problems)")
    if "chosen_nll" in trained:
        print(f"  chosen completions         {trained['chosen_nll']:8.3f} nats per token "
              f"(perplexity {trained['chosen_ppl']:.2f}) on the eval pairs")
    if "logratio/chosen" in trained:
        for i, which in enumerate(("chosen", "rejected")):
            print(f"  {which + ' log-prob change':26} {trained['logratio/' + which]:+8.2f} nats   (trained "
                  f"{trained['logps/' + which]:.2f} vs start {start_eval_logps[i].mean():.2f})")
        beta_times = cfg.loss not in LOSSES or LOSSES[cfg.loss].reference  # SFT's figures are DPO's
        print(f"  {'margin c - r':26} {trained['logratio/chosen'] - trained['logratio/rejected']:+8.2f} nats"
              + ("   (the log line's margin is beta times it)" if beta_times else ""))
        print(f"  reward accuracy            {trained['rewards/accuracies']:8.1%}")
    if start_texts is not None:
        print_examples(problems[:3], {"start": start_texts, "trained": texts},
                       "the first 3 test problems, greedy completions")
    return summary


def print_examples(problems, completions, title):
    """Problems side by side: each prompt, then every model's completion, marked right or wrong by
    its final answer (what the accuracy figures count). problems: (prompt, answer) pairs, answer
    None for a prompt without one; completions: {model name: texts, in the problems' order}.

        --- the first 3 test problems, greedy completions
          123+456=   answer 579
            reference  right  3+6=9; 2+5=7; 1+4=5; answer 579
            trained    wrong  3+6=9; 2+5=8; 1+4=5; answer 589
    """
    width = max(map(len, completions))
    print(f"--- {title}")
    for i, (prompt, answer) in enumerate(problems):
        print(f"  {prompt}" + ("" if answer is None else f"   answer {answer}"))
        for name, texts in completions.items():
            mark = "" if answer is None else "right  " if answer_of(texts[i]) == answer else "wrong  "
            print(f"    {name:{width}}  {mark}" + texts[i].replace("\n", "\\n"))  # one line each
