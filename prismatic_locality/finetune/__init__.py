"""`locality finetune`: classification fine-tuning of a stock or aligned backbone (docs/finetune.md)."""
