/* Preloaded (LD_PRELOAD) into the local tritonserver by serving/local_triton.py.
 *
 * Triton 2.51 has no address flag for its SageMaker listener, which binds the wildcard
 * address. This library turns a wildcard bind (0.0.0.0 or ::) into a loopback one, so the
 * local server is reachable from this machine only. Binds to any other address pass through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_function)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *address, socklen_t length) {
    static bind_function real_bind;
    if (!real_bind) {
        real_bind = (bind_function)dlsym(RTLD_NEXT, "bind");
    }
    if (address && address->sa_family == AF_INET && length >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in loopback;
        memcpy(&loopback, address, sizeof loopback);
        if (loopback.sin_addr.s_addr == htonl(INADDR_ANY)) {
            loopback.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&loopback, sizeof loopback);
        }
    }
    if (address && address->sa_family == AF_INET6 && length >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 loopback;
        memcpy(&loopback, address, sizeof loopback);
        if (memcmp(&loopback.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            loopback.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&loopback, sizeof loopback);
        }
    }
    return real_bind(fd, address, length);
}
