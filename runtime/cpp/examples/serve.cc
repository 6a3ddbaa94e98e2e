// Embedding samg's C++ runtime in a service: a minimal single-threaded HTTP endpoint on plain sockets.
//
//   samg-serve-example EXPORT_DIR --cond DIR [--port 8080] [--max-requests N]
//   curl -s -X POST localhost:8080/generate -d '{"w_min": 4, "w_max": 7.5, "steps": 20, "seed": 1}' > out.png
//
// The prompt's conditioning is loaded once from --cond (`samg encode` output); each request picks
// guidance strength, sampler, steps and seed, and gets a PNG back. Listens on 127.0.0.1 only.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>

#include "samg/runtime.h"

namespace {

std::string png_bytes(const samg::Image& image) {
  const std::string tmp = "/tmp/samg-serve-" + std::to_string(getpid()) + ".png";
  samg::write_png(tmp, image);
  std::ifstream file(tmp, std::ios::binary);
  std::stringstream bytes;
  bytes << file.rdbuf();
  std::remove(tmp.c_str());
  return bytes.str();
}

void reply(int client, const std::string& status, const std::string& type, const std::string& body) {
  std::string head = "HTTP/1.1 " + status + "\r\nContent-Type: " + type + "\r\nContent-Length: " +
                     std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
  const std::string all = head + body;
  for (size_t sent = 0; sent < all.size();) {
    const ssize_t n = write(client, all.data() + sent, all.size() - sent);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: samg-serve-example EXPORT_DIR --cond DIR [--port 8080] [--max-requests N]\n";
    return 2;
  }
  std::string export_dir = argv[1], cond_dir;
  int port = 8080, max_requests = -1;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--cond") cond_dir = argv[i + 1];
    else if (flag == "--port") port = std::stoi(argv[i + 1]);
    else if (flag == "--max-requests") max_requests = std::stoi(argv[i + 1]);
  }
  samg::Runtime runtime(export_dir, samg::RuntimeOptions{});
  std::map<std::string, samg::Tensor> conditioning;
  for (const auto& name : runtime.conditioning_names()) conditioning[name] = samg::read_npy(cond_dir + "/" + name + ".npy");
  const auto& latent = runtime.manifest()["latent"];
  const int64_t channels = latent["channels"], factor = latent["spatial_factor"];
  const int64_t h = latent["height"].get<int64_t>() / factor, w = latent["width"].get<int64_t>() / factor;

  const int server = socket(AF_INET, SOCK_STREAM, 0);
  const int yes = 1;
  setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(server, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 || listen(server, 8) != 0) {
    std::perror("samg-serve-example: bind/listen");
    return 1;
  }
  std::cerr << "samg-serve-example: POST http://127.0.0.1:" << port << "/generate\n";
  for (int served = 0; max_requests < 0 || served < max_requests; ++served) {
    const int client = accept(server, nullptr, nullptr);
    if (client < 0) continue;
    std::string request(1 << 16, '\0');
    const ssize_t n = read(client, &request[0], request.size());
    request.resize(n > 0 ? static_cast<size_t>(n) : 0);
    try {
      if (request.rfind("POST /generate", 0) != 0) {
        reply(client, "404 Not Found", "text/plain", "POST /generate with a JSON body\n");
      } else {
        const size_t body_at = request.find("\r\n\r\n");
        const auto body = nlohmann::json::parse(body_at == std::string::npos ? "{}" : request.substr(body_at + 4));
        samg::Request req;
        req.guidance = body.value("guidance", std::string("samg"));
        req.w_max = body.value("w_max", 7.5);
        req.w_min = body.value("w_min", req.guidance == "samg" ? (1 + req.w_max) / 2 : req.w_max);
        req.steps = body.value("steps", 20);
        req.sampler = body.value("sampler", std::string("euler"));
        std::mt19937_64 generator(body.value("seed", 0));
        std::normal_distribution<float> normal;
        samg::Tensor noise{{1, channels, h, w}, std::vector<float>(static_cast<size_t>(channels * h * w))};
        for (float& v : noise.data) v = normal(generator);
        const auto images = runtime.decode(runtime.sample(conditioning, noise, req));
        reply(client, "200 OK", "image/png", png_bytes(images.at(0)));
      }
    } catch (const std::exception& error) {
      reply(client, "400 Bad Request", "text/plain", std::string(error.what()) + "\n");
    }
    close(client);
  }
  close(server);
  return 0;
}
