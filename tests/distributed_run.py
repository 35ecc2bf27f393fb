"""Run by test_distributed.py under torchrun with 2 CPU processes (gloo): a short E-GRPO run that records
each rank's prompts and final trainable weights."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_trainer  # noqa: E402

output_dir = sys.argv[1]
seen_prompts = []


def reward(images, prompts, **columns):
    seen_prompts.extend(prompts)
    return -(images.mean(dim=(1, 2, 3)) - 1.0).abs()


trainer = tiny_trainer(output_dir, reward_fns=[reward], max_steps=2, save_steps=2, num_generations=3,
                       prompts_per_device=1)
state = trainer.train()
trainer.save_model(os.path.join(output_dir, "final"))  # after train(): the process group must still be up
rank = trainer.accelerator.process_index
weights = {name: p.detach() for name, p in trainer.unwrapped_model.named_parameters() if p.requires_grad}
torch.save(weights, os.path.join(output_dir, f"weights_{rank}.pt"))
with open(os.path.join(output_dir, f"rank_{rank}.json"), "w") as handle:
    json.dump({"num_processes": trainer.accelerator.num_processes, "prompts": sorted(set(seen_prompts)),
               "distributed_type": str(trainer.accelerator.distributed_type),
               "log_history": state.log_history}, handle)
