"""Adapters to other people's training loops (Megatron-LM's `pretrain_gpt.py`)."""
