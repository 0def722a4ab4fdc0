"""The scenes model: a latent diffusion model with Stable Diffusion v1.4's architecture, scaled down,
trained here on the rendered scenes of training.scenes (`python -m training.scenes_model train`).

- architecture.py  the component configs (SD's block structure, 16 attn1 layers), the word-level tokenizer
- data.py          the caption space, the held-out captions, the cached renders
- train.py         VAE → latents → U-Net + text encoder (CFG dropout, EMA, resumable, torchrun)
- evaluate.py      adherence of samples to held-out captions, judged by the label models
"""
