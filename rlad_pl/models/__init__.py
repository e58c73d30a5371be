"""Models: loading students / teachers / tokenizers (``loading``), LoRA students (``lora``), FSDP2 sharding
(``distributed``) and ``torch.compile`` of the backbones (``compiled``). Imports ``rlad_pl.core`` only."""
