"""E-GRPO on the HPD v2 prompts: the paper's recipe (FLUX.1-dev, HPS-v2.1 reward), from a YAML recipe.

The paper's setting (full fine-tuning, 8 GPUs):

    accelerate launch --config_file examples/accelerate/fsdp_full_shard.yaml examples/hpd.py \\
        --config examples/recipes/flux_dev_hps.yaml

A LoRA on one 80 GB GPU:

    accelerate launch --config_file examples/accelerate/single_gpu.yaml examples/hpd.py \\
        --config examples/recipes/flux_dev_lora_single_gpu.yaml

Offline, on a CPU, in a minute (the embedded tiny FLUX pipeline, a local prompt file, a weight-free reward):

    python examples/hpd.py --model_name_or_path tiny --torch_dtype float32 --dataset_name prompts.txt \\
        --reward_funcs color --height 64 --width 64 --max_sequence_length 32 --num_inference_steps 8 \\
        --num_active_steps 4 --num_generations 4 --prompts_per_device 4 --mixed_precision no --learning_rate 1e-2 \\
        --clip_range 1e-2 --max_steps 20 --output_dir tiny-run

On CPUs, several processes run with torchrun (``torchrun --nproc_per_node 2 examples/hpd.py ...``);
``accelerate launch --cpu --num_processes 2`` would start only one, so the script refuses it.

Every field of ``ScriptArguments`` and of ``EGRPOConfig`` is an option, in the YAML file given to ``--config``
or on the command line (which overrides the file). This script is ``trl-flow-egrpo train``: the recipe it runs,
step by step, is ``train`` in ``trl_flow_egrpo/commands/train.py``.
"""

from trl_flow_egrpo.commands.train import ScriptArguments, main

__all__ = ["ScriptArguments", "main"]  # what is loaded (model, rewards, prompts); the run

if __name__ == "__main__":
    main()
