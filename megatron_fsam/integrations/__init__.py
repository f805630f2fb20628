"""Front ends for other people's training loops, over the backends, over the algorithm.

- `megatron_core.py`: Megatron-core's forward_backward_func, every parallel layout
  (`megatron_fsam.FuncSAM`)
- `megatron_lm.py`: Megatron-LM's `pretrain_gpt.py` (`--sam-*` flags, the patch or no-diff route)
- `deepspeed.py`: a DeepSpeed engine, ZeRO 0-3 (`megatron_fsam.deepspeed.FuncSAM`)
- `pytorch.py`: a plain PyTorch loop, one process, DDP or FSDP2 (`megatron_fsam.pytorch.FuncSAM`)
- `hf_trainer.py`: the Hugging Face Trainer, over the PyTorch or the DeepSpeed front end
  (`megatron_fsam.hf.FuncSAMTrainer`)
- `microbatches.py`: what the DeepSpeed and PyTorch front ends share (`train_step(batches,
  forward)`)
"""
