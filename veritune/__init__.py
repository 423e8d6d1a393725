"""veritune: grounded QLoRA fine-tuning of Llama 3.1 on a company's own documents."""

__version__ = "0.1.0"
