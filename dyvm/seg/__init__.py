"""Semantic segmentation with a dense Vim or DyVM backbone: UperNet on torch and torchvision only.

backbone: feature maps with pruned tokens restored (frozen) at their positions; neck: four scales;
heads: UPerHead and the FCN auxiliary head; segmentor: the whole model, its loss and slide inference.
"""
