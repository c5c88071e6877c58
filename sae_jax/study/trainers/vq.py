"""Chameleon's VQ image tokenizer: trained to reconstruct the images (foreground-weighted), then
frozen; the code token ids of every image.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from sae_jax.data import coco
from sae_jax.study.trainers.common import Progress, split_images


def vq_decoder(embed_dim: int, channels: int, levels: int):
  """A small convolutional decoder (codes -> pixels) that trains the VQ-VAE with a reconstruction
  loss; Chameleon keeps only the encoder and codebook, as the released model does."""
  import torch.nn as nn

  layers = [nn.Conv2d(embed_dim, channels, 3, padding=1), nn.SiLU()]
  for _ in range(levels):
    layers += [nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.SiLU()]
  layers += [nn.Conv2d(channels, 3, 3, padding=1)]
  return nn.Sequential(*layers)


def foreground_weights(x, alpha: float):
  """[B, 1, H, W] per-pixel weights of the VQ-VAE's reconstruction loss: 1 + alpha * the pixel's
  distance from its image's per-channel median (the background), normalised to mean 1 per image.
  With plain MSE the codes describe the background that fills most pixels; small objects, what the
  captions talk about, would share codes with it."""
  import torch

  if alpha <= 0:
    return torch.ones_like(x[:, :1])
  med = x.flatten(2).median(dim=2).values[:, :, None, None]
  w = 1 + alpha * (x - med).norm(dim=1, keepdim=True)
  return w / w.mean(dim=(2, 3), keepdim=True)


def train_chameleon_vq(model, processor, images: list, cfg: Any, log: Callable) -> dict:
  """Trains Chameleon's VQ-VAE (encoder, quant conv, codebook) to reconstruct `images` (MSE plus the
  codebook / commitment loss, straight-through gradients); the codebook starts at, and unused codes
  restart from, encoder outputs (a random codebook collapses onto a few codes). Returns figures on
  the training images: reconstruction MSE beside the pixel variance, codes used, perplexity."""
  import torch

  c = cfg.chameleon
  vq = model.model.vqmodel
  px = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
  levels = len(c.vq_channel_multiplier) - 1
  dec = vq_decoder(int(c.vq_embed_dim), int(c.vq_channels), levels)
  params = list(vq.encoder.parameters()) + list(vq.quant_conv.parameters()) + list(vq.quantize.parameters())
  opt = torch.optim.Adam(params + list(dec.parameters()), lr=float(c.vq_lr))
  rng = np.random.default_rng(int(cfg.seed))
  steps, bs = int(c.vq_steps), int(c.vq_batch_size)
  progress = Progress("chameleon VQ-VAE", steps, float(cfg.log_every_s), log)
  vq.train()
  n_codes = int(c.vq_codes)
  fg = float(c.vq_foreground_weight)
  usage = torch.zeros(n_codes)
  every = max(1, min(50, steps // 10))
  for step in range(steps):
    idx = torch.as_tensor(rng.choice(px.shape[0], size=min(bs, px.shape[0]), replace=False))
    x = px[idx]
    z = vq.quant_conv(vq.encoder(x))
    if step % every == 0 and step + 1 < steps:  # (re)start unused codes at random encoder outputs
      dead = torch.arange(n_codes) if step == 0 else torch.nonzero(usage < 1e-3).flatten()
      if len(dead):
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.as_tensor(rng.integers(0, flat.shape[0], size=len(dead)))
        with torch.no_grad():
          vq.quantize.embedding.weight[dead] = flat[pick]
        usage[dead] = 1.0
    zq, emb_loss, codes = vq.quantize(z)
    recon = dec(zq)
    rec = torch.mean(foreground_weights(x, fg) * (recon - x) ** 2)
    loss = rec + emb_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    usage = 0.9 * usage + 0.1 * torch.bincount(codes, minlength=n_codes).float()
    progress.update(step, loss.item(), f" | reconstruction {rec.item():.4f}")
  vq.eval()
  with torch.inference_mode():
    x = px[: min(512, px.shape[0])]
    z = vq.quant_conv(vq.encoder(x))
    zq, _, codes = vq.quantize(z)
    mse = float(torch.mean((dec(zq) - x) ** 2))
    p = torch.bincount(codes, minlength=n_codes).float()
    p = p / p.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    var = float(x.var())
  figures = {
    "vq_reconstruction_mse": mse,
    "vq_pixel_variance": var,
    "vq_codes_used": int((p > 0).sum()),
    "vq_codes": n_codes,
    "vq_perplexity": perplexity,
    "vq_steps": steps,
  }
  log(
    f"chameleon VQ-VAE: reconstruction MSE {mse:.4f} (pixel variance {var:.4f}), {figures['vq_codes_used']}"
    f"/{n_codes} codes used, perplexity {perplexity:.1f}"
  )
  return figures


def chameleon_split_codes(model, processor, src: coco.CocoCaptionsJson, chunk: int = 1024):
  """[N, image_seq_length] code token ids of every image of a split, computed once (the VQ-VAE is
  frozen); the images are read a chunk at a time, as the split may be large."""
  import torch

  n = len(src.images)
  return torch.cat(
    [
      chameleon_code_ids(model, processor, split_images(src, range(s, min(s + chunk, n))))
      for s in range(0, n, chunk)
    ]
  )


def chameleon_code_ids(model, processor, images: list, batch: int = 128):
  """[N, image_seq_length] the decoder token ids of each image's VQ codes, exactly what
  `ChameleonModel` swaps in for the `<image>` positions (the VQ-VAE is frozen once trained)."""
  import torch

  out = []
  with torch.inference_mode():
    for s in range(0, len(images), batch):
      px = processor.image_processor(images=images[s : s + batch], return_tensors="pt")["pixel_values"]
      out.append(model.model.get_image_tokens(px).long())
  return torch.cat(out)
