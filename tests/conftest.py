import torch

# Two cores: a test runner that spawns a second thread pool stalls at every barrier.
torch.set_num_threads(1)
