"""LoRA fine-tuning of a Hugging Face causal language model, as asimov runs it.

Everything comes from the environment (the job manifest's `env:` and `secrets:`):

  HF_MODEL           model id on the hub (or a local folder)
  HF_DATASET         dataset id on the hub (or a local folder / data file)
  HF_DATASET_SUBSET  dataset configuration, optional
  HF_HUB_REPO        repository the fine-tuned model is pushed to at the end, optional
  HF_TOKEN           the user's token (from asimov's 0600 secret file, never a flag)
  MAX_STEPS          training steps (default 200), BATCH_SIZE (8), SEQ_LEN (256)
  CHECKPOINT_DIR     where checkpoints go (default output/ckpt: the job's checkpoint path)
  ASIMOV_METRICS     file that receives one JSON object per logged step
  ASIMOV_RESUME_FROM a checkpoint folder restored by asimov after a lost instance

Progress is a tqdm bar (`n/total`), which asimov reads from the output. PEFT
checkpoints hold only the adapter, so each checkpoint names its base model too.
"""

import json
import os
import sys
import time


def env(name, default=None):
    value = os.environ.get(name, "")
    return value if value else default


def text_of(example):
    """One training text from the common dataset shapes."""
    if "text" in example and isinstance(example["text"], str):
        return example["text"]
    parts = [
        str(example[k])
        for k in ("instruction", "input", "prompt", "question", "output", "response", "answer")
        if k in example and example[k]
    ]
    if parts:
        return "\n".join(parts)
    return " ".join(str(v) for v in example.values() if isinstance(v, str))


def load_data(name, subset):
    import datasets

    if os.path.isfile(name):
        kind = "json" if name.endswith((".json", ".jsonl")) else "text"
        return datasets.load_dataset(kind, data_files=name, split="train")
    if os.path.isdir(name):
        return datasets.load_from_disk(name) if os.path.exists(
            os.path.join(name, "dataset_info.json")
        ) else datasets.load_dataset(name, subset, split="train")
    return datasets.load_dataset(name, subset, split="train")


def latest_checkpoint(folder):
    if not folder or not os.path.isdir(folder):
        return None
    steps = [d for d in os.listdir(folder) if d.startswith("step-")]
    if not steps:
        return None
    return os.path.join(folder, max(steps, key=lambda d: int(d.split("-")[1])))


def main():
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_name = env("HF_MODEL")
    dataset_name = env("HF_DATASET")
    if not model_name or not dataset_name:
        sys.exit("HF_MODEL and HF_DATASET must be set")
    subset = env("HF_DATASET_SUBSET")
    hub_repo = env("HF_HUB_REPO")
    token = env("HF_TOKEN")
    max_steps = int(env("MAX_STEPS", "200"))
    batch_size = int(env("BATCH_SIZE", "8"))
    seq_len = int(env("SEQ_LEN", "256"))
    ckpt_dir = env("CHECKPOINT_DIR", os.path.join("output", "ckpt"))
    metrics_path = env("ASIMOV_METRICS")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(model_name, token=token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_name, token=token)

    resume = latest_checkpoint(env("ASIMOV_RESUME_FROM")) or latest_checkpoint(ckpt_dir)
    start_step = 0
    if resume:
        model = PeftModel.from_pretrained(base, resume, is_trainable=True)
        with open(os.path.join(resume, "asimov_state.json")) as f:
            start_step = json.load(f)["step"]
        print(f"resuming from {resume} at step {start_step}", flush=True)
    else:
        targets = "all-linear"
        model = get_peft_model(
            base,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                       task_type="CAUSAL_LM"),
        )
    model.to(device)
    model.train()

    data = load_data(dataset_name, subset)
    texts = [text_of(e) for e in data]
    texts = [t for t in texts if t.strip()] or ["empty dataset"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=float(env("LR", "2e-4"))
    )
    if resume and os.path.exists(os.path.join(resume, "optimizer.pt")):
        optimizer.load_state_dict(torch.load(os.path.join(resume, "optimizer.pt")))

    save_every = max(1, int(env("SAVE_EVERY", str(max(1, max_steps // 4)))))
    metrics = open(metrics_path, "a") if metrics_path else None

    def save(step):
        path = os.path.join(ckpt_dir, f"step-{step}")
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        torch.save(optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
        with open(os.path.join(path, "asimov_state.json"), "w") as f:
            json.dump({"step": step, "base_model": model_name}, f)

    bar = tqdm(total=max_steps, initial=start_step, file=sys.stdout, mininterval=0.5)
    step = start_step
    started = time.time()
    while step < max_steps:
        i = (step * batch_size) % len(texts)
        batch = [texts[(i + k) % len(texts)] for k in range(batch_size)]
        enc = tokenizer(batch, return_tensors="pt", truncation=True, max_length=seq_len,
                        padding=True).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        bar.update(1)
        if metrics:
            metrics.write(json.dumps({"step": step, "loss": loss.item(),
                                      "elapsed_s": round(time.time() - started, 3)}) + "\n")
            metrics.flush()
        if step % save_every == 0 or step == max_steps:
            save(step)
    bar.close()
    if metrics:
        metrics.close()

    if hub_repo:
        merged = model.merge_and_unload()
        merged.push_to_hub(hub_repo, token=token, private=True)
        tokenizer.push_to_hub(hub_repo, token=token, private=True)
        print(f"pushed to {hub_repo}", flush=True)


if __name__ == "__main__":
    main()
