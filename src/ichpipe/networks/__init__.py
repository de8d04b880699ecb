"""The models and what feeds them: the slice dataset and its transforms, the CNNs, losses, optimisers, inference with
TTA, the sequence models, the bundle's file format. Stands on imaging and base."""
