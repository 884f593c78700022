"""LoRA fine-tuning of a Hugging Face causal language model, as asimov runs it.

Everything comes from the environment (the job manifest's `env:` and `secrets:`):

  HF_MODEL           model id on the hub (or a local folder)
  HF_DATASET         dataset id on the hub (or a local folder / .json / .jsonl / .txt file)
  HF_DATASET_SUBSET  dataset configuration (subset), optional
  HF_HUB_REPO        repository the fine-tuned model is pushed to at the end, optional
  HF_TOKEN           the user's token (from asimov's 0600 secret file, never a flag)
  HF_ENDPOINT        the hub's address (huggingface_hub's own variable; default the hub)
  MAX_STEPS          training steps (default 200); BATCH_SIZE (8), SEQ_LEN (256), LR (2e-4)
  SAVE_EVERY         steps between checkpoints (default a quarter of MAX_STEPS)
  KEEP_CHECKPOINTS   how many checkpoints to keep (default 2)
  CHECKPOINT_DIR     where checkpoints go (default output/ckpt: the job's checkpoint path)
  ASIMOV_METRICS     file that receives one JSON object per step (set by asimov's agent)
  ASIMOV_RESUME_FROM a checkpoint folder restored by asimov for a new attempt

Progress is a tqdm bar (`n/total`), which asimov reads from the output. A checkpoint is
`CHECKPOINT_DIR/step-N/`: the LoRA adapter, the tokenizer, the optimizer and
`asimov_state.json` (step and base model, written last: a folder without it is not a
checkpoint). PEFT saves only the adapter, so the state names the base model, and a
resume refuses a different one. SIGTERM (asimov's pause or stop) saves a checkpoint of
the current step before leaving.
"""

import json
import os
import shutil
import signal
import sys
import tempfile
import time

STATE = "asimov_state.json"

# asimov's progress is the last bar in the output: the hub's download and upload bars and
# the datasets' ones would stand in for the training's (an upload's 1/1 after 200/200).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def env(name, default=None):
    value = os.environ.get(name, "")
    return value if value else default


def text_of(example):
    """One training text from the common dataset shapes."""
    if isinstance(example.get("text"), str):
        return example["text"]
    keys = ("instruction", "input", "prompt", "question", "output", "response", "answer")
    parts = [str(example[k]) for k in keys if example.get(k)]
    if parts:
        return "\n".join(parts)
    return " ".join(str(v) for v in example.values() if isinstance(v, str))


def load_data(name, subset):
    """The train split of a hub dataset, a local dataset folder or a data file."""
    import datasets

    datasets.disable_progress_bars()
    if os.path.isfile(name):
        kind = "json" if name.endswith((".json", ".jsonl")) else "text"
        return datasets.load_dataset(kind, data_files=name, split="train")
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        return datasets.load_from_disk(name)
    # A hub id, or a folder laid out like a hub dataset (its README's `configs:`
    # naming the subsets).
    return datasets.load_dataset(name, subset, split="train")


def complete(path):
    return os.path.isfile(os.path.join(path, STATE))


def step_of(path):
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def checkpoints(folder):
    """Complete checkpoints under `folder`, oldest first."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for d in os.listdir(folder):
        path = os.path.join(folder, d)
        if d.startswith("step-") and d[5:].isdigit() and complete(path):
            found.append((int(d[5:]), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(path):
    """The newest checkpoint at `path`: the checkpoint itself, or the newest in it."""
    if path and os.path.isdir(path) and complete(path):
        return path
    found = checkpoints(path)
    return found[-1] if found else None


def main():
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    model_name = env("HF_MODEL")
    dataset_name = env("HF_DATASET")
    if not model_name or not dataset_name:
        sys.exit("train.py: HF_MODEL and HF_DATASET must be set")
    subset = env("HF_DATASET_SUBSET")
    hub_repo = env("HF_HUB_REPO")
    token = env("HF_TOKEN")
    if hub_repo and not token:
        sys.exit("train.py: HF_HUB_REPO is set but HF_TOKEN is not; the push would fail")
    max_steps = int(env("MAX_STEPS", "200"))
    batch_size = int(env("BATCH_SIZE", "8"))
    seq_len = int(env("SEQ_LEN", "256"))
    save_every = max(1, int(env("SAVE_EVERY", str(max(1, max_steps // 4)))))
    keep = max(1, int(env("KEEP_CHECKPOINTS", "2")))
    ckpt_dir = env("CHECKPOINT_DIR", os.path.join("output", "ckpt"))
    metrics_path = env("ASIMOV_METRICS")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    # asimov's pause and stop send SIGTERM, then SIGKILL a few seconds later: finish the
    # step, save it, leave.
    stop = {"requested": False}

    def on_term(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_term)

    print(f"loading {model_name}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_name, token=token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_name, token=token)

    resume = latest_checkpoint(env("ASIMOV_RESUME_FROM")) or latest_checkpoint(ckpt_dir)
    start_step = 0
    if resume:
        state = step_of(resume)
        if state.get("base_model") != model_name:
            sys.exit(
                f"train.py: the checkpoint {resume} was trained from "
                f"{state.get('base_model')!r}, not {model_name!r}"
            )
        model = PeftModel.from_pretrained(base, resume, is_trainable=True)
        start_step = int(state["step"])
        print(f"resuming from {resume} at step {start_step}", flush=True)
    else:
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    model.to(device)
    model.train()

    data = load_data(dataset_name, subset)
    texts = [t for t in (text_of(e) for e in data) if t.strip()]
    if not texts:
        sys.exit(f"train.py: the dataset {dataset_name} has no text")
    print(f"dataset: {len(texts)} examples", flush=True)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=float(env("LR", "2e-4"))
    )
    if resume and os.path.exists(os.path.join(resume, "optimizer.pt")):
        optimizer.load_state_dict(torch.load(os.path.join(resume, "optimizer.pt")))

    def save(step):
        final = os.path.join(ckpt_dir, f"step-{step}")
        if complete(final):
            return
        # Written beside its final name and renamed: a sync (or a kill) in the middle
        # never sees half a checkpoint as one.
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        torch.save(optimizer.state_dict(), os.path.join(partial, "optimizer.pt"))
        with open(os.path.join(partial, STATE), "w") as f:
            json.dump({"step": step, "base_model": model_name}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        for old in checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    metrics = open(metrics_path, "a") if metrics_path else None
    bar = tqdm(total=max_steps, initial=start_step, file=sys.stdout, mininterval=0.5)
    step = start_step
    started = time.time()
    while step < max_steps:
        i = (step * batch_size) % len(texts)
        batch = [texts[(i + k) % len(texts)] for k in range(batch_size)]
        enc = tokenizer(
            batch, return_tensors="pt", truncation=True, max_length=seq_len, padding=True
        ).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        bar.update(1)
        if metrics:
            record = {
                "step": step,
                "loss": loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": round(time.time() - started, 3),
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if step % save_every == 0 or step == max_steps or stop["requested"]:
            save(step)
        if stop["requested"]:
            bar.close()
            print(f"stopped at step {step}; checkpoint saved", flush=True)
            sys.exit(143)
    bar.close()
    if metrics:
        metrics.close()

    if hub_repo:
        push(model.merge_and_unload(), tokenizer, hub_repo, token, model_name, dataset_name,
             subset, step)


def push(merged, tokenizer, repo, token, base_model, dataset, subset, steps):
    """The merged model, its tokenizer and a model card, in one commit to `repo`."""
    from huggingface_hub import HfApi

    print(f"pushing the merged model to {repo}", flush=True)
    api = HfApi(token=token)
    api.create_repo(repo, private=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        subset_line = f" (subset `{subset}`)" if subset else ""
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(
                "---\n"
                f"base_model: {json.dumps(base_model)}\n"
                "library_name: transformers\n"
                "tags: [asimov, lora, fine-tuned]\n"
                "---\n\n"
                f"# {repo}\n\n"
                f"{base_model} fine-tuned with LoRA on {dataset}{subset_line} for {steps} "
                "steps by asimov's hf-finetune template; the adapter is merged into "
                "these weights.\n"
            )
        api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            commit_message=f"Fine-tune of {base_model} ({steps} steps)",
        )
    print(f"pushed to {repo}", flush=True)


if __name__ == "__main__":
    main()
