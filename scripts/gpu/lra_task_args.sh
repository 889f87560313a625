# Sourced by the LRA step-profiling rounds: lra_task_args TASK prints the config overrides
# that let profile_train_step.py build TASK's data on the GPU machine quickly (a small
# generated ListOps / Pathfinder; Text and Image from .lra_data, copies of ../shared/data;
# TEXT_DATA another aclImdb tarball, e.g. a subset small enough to carry beside a run:
#   mkdir /tmp/s && tar xzf ../shared/data/imdb/aclImdb.tar.gz -C /tmp/s && for d in
#   /tmp/s/aclImdb/{train,test}/{pos,neg}; do ls $d | sort | tail -n +1001 | sed "s|^|$d/|" |
#   xargs rm; done && tar czf .lra_data/aclImdb_small.tar.gz -C /tmp/s
#   aclImdb/{train,test}/{pos,neg}    # 1,000 reviews per split and label, 2.3 MB).
lra_task_args() {
  case $1 in
    listops) echo "--config.data.num_train=2000" ;;
    text) echo "--config.data.data_dir=${TEXT_DATA:-.lra_data/aclImdb.tar.gz}" ;;
    image) echo "--config.data.data_dir=.lra_data/cifar10-jpeg.tar.gz" ;;
    pathfinder) echo "--config.data.num_examples=4000" ;;
  esac
}
