"""A ``train.py`` run: the stages that write it, the finished run opened for answering, and its
loggers."""
