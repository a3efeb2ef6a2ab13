"""What train.py needs beside the recipe: LLaVA records -> token ids and labels (chat_data.py), the loss over
labelled positions (loss.py), the caches of repeated work (caches.py), and torchrun, resume and logs (runs.py)."""
