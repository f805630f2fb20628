# Sourced by launch/deepspeed.sh and launch/torchrun.sh, after they fill `launcher_args`.
# option_value NAME...: the value of a launcher option spelled any of NAME... (--opt VALUE
# or --opt=VALUE), empty when absent.
option_value() {
    local i name
    for ((i = 0; i < ${#launcher_args[@]}; i++)); do
        for name in "$@"; do
            case "${launcher_args[i]}" in
                "$name") echo "${launcher_args[i + 1]:-}"; return ;;
                "$name"=*) echo "${launcher_args[i]#*=}"; return ;;
            esac
        done
    done
}
