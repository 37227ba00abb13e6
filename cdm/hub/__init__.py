"""Model cards and publishing to the Hugging Face Hub."""
