"""Shared pieces of every process (driver, Ray actors, tools)."""

from common.quiet import silence_bitsandbytes_kernels_notice

silence_bitsandbytes_kernels_notice()  # before any module here imports diffusers/peft (and so bitsandbytes)
