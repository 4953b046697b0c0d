"""(being written)"""
def encode(symbols, alphabet): raise NotImplementedError
def decode(data, alphabet, count): raise NotImplementedError
