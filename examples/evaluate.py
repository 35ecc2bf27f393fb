"""Score a base model and its E-GRPO fine-tune on the HPD v2 test prompts, side by side, with the paper's
numbers next to ours when they are comparable.

One image per prompt, prompt ``i`` from the noise of seed ``eval_seed + i`` for both models, so the comparison
is paired image by image. Metrics default to the paper's: HPS-v2.1, CLIP score, PickScore, ImageReward.
Two sampling protocols:

- ``--protocol paper`` (default): the authors' evaluation, the plain pipeline call at 1024x1024, 50 steps,
  guidance 3.5, with the pipeline's own scheduler and dynamic shift (FLUX.1-dev). For SD3 the paper reports
  nothing; the protocol then uses the SD3.5-medium model card's settings (1024x1024, 40 steps, CFG 4.5).
  ``--eval_height/--eval_width/--eval_num_inference_steps/--eval_guidance_scale`` override them (the table
  then says the numbers are not comparable to the paper's).
- ``--protocol training``: the training schedule of the recipe (e.g. 16 steps, static shift 3, 720x720),
  sampled deterministically (ODE) as the trainer's own evaluation does. The paper's numbers are not shown.

    python examples/evaluate.py --config examples/recipes/flux_dev_hps.yaml --trained_model flux-dev-egrpo-hps

The training settings (resolution, steps, shift, guidance, batch sizes) are EGRPOConfig fields, so the recipe
gives them; its training-only keys are ignored. ``--trained_model`` is a LoRA directory
(``pytorch_lora_weights.safetensors``), a full fine-tune's output directory (``transformer/``), or a Hub
repository with either. Offline on a CPU, with the tiny pipeline and weight-free metrics:

    python examples/evaluate.py --model_name_or_path tiny --torch_dtype float32 --trained_model tiny-run \\
        --test_dataset_name prompts.txt --metrics color brightness --height 64 --width 64 \\
        --max_sequence_length 32 --num_inference_steps 8 --protocol training

This script is ``trl-flow-egrpo evaluate``; the code is ``trl_flow_egrpo/commands/evaluate.py``.
"""

from trl_flow_egrpo.commands.evaluate import main

if __name__ == "__main__":
    main()
