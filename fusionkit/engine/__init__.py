"""What runs a model: data windows, model composition, training, evaluation, checkpoints,
run directories, distributed training, streaming and predictions."""
