"""Stage 1, adversarial erasing: train, localise with CAMs, erase, repeat."""
