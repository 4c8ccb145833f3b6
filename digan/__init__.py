"""DIGAN: dynamics-aware implicit video GAN (Yu, Tack, Mo et al., ICLR 2022), distributed with Ray + DeepSpeed."""

__version__ = "0.1.0"
