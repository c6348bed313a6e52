"""Preference fine-tuning: tokenised batches, losses, the Ray Train worker loop and its launcher."""
