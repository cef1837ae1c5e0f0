"""Command-line interface of vaultgemma-hf (`vaultgemma-hf COMMAND ...`)."""
