"""Semantic segmentation with a dense Vim or DyVM backbone: UperNet on torch and torchvision only.

backbone   feature maps after chosen layers; pruned tokens keep their last feature, frozen at their position
neck       the authors' four-scale neck (deconvolutions, identity, max-pool)
heads      UPerHead and the FCN auxiliary head
segmentor  the whole model, its factory (build_segmentor), slide inference, SyncBatchNorm under DDP
losses     pixel cross-entropy + auxiliary + DyVM's token / block ratio losses
checkpoint initialisation from classification (Vim / DyVM) or segmentation checkpoints
data       ADE20K, image/mask folders, embedded Animal-MNIST scenes; joint image/mask augmentation
metrics    mIoU / mAcc / aAcc from a confusion matrix
optim      AdamW with layer-wise lr decay, poly schedule with linear warm-up
flops      MACs in the paper and full conventions
engine     one training step; evaluation (slide inference, tokens, gates, MACs)
config/run `python main.py seg` (also `python -m dyvm.seg`)
report / visualize   the CPU demo's report and figure
"""
