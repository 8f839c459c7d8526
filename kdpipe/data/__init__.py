"""Reading and splitting data: classification tables, translation pairs, text decoding."""
