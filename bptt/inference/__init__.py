"""What a trained checkpoint does: ``generate`` text, ``transcribe`` audio, ``forecasting`` (the next values of
a series)."""
