#!/usr/bin/python3
"""Dev-only: image fixtures and Pillow goldens for tests/unit/test_image_golden.c (style.md section 3.4).

Run with Debian's Pillow + numpy:  /usr/bin/python3 scripts/dump_pixels.py tests/fixtures/img

Writes into DIR:
  *.png     written by our own PNG encoder below (every colour type and bit depth, tRNS, short palettes, Adam7,
            all five row filters), so the bytes are fully controlled and Pillow is the independent decoder;
  *.jpg     baseline 4:2:0, progressive, grayscale, 4:4:4, CMYK (Pillow's encoder = libjpeg-turbo);
  *.webp    lossy, lossless with alpha, lossy with alpha, animated (Pillow's encoder = libwebp);
  decode.txt  one line per image: "file mode width height golden_drop golden_white", where the goldens are
            raw RGB8 dumps of Image.open(file).convert("RGB") (pipeline A) and of qwen-vl-utils' to_rgb
            (RGBA pasted on white with the alpha band as mask; every other mode convert("RGB")) (pipeline B);
  resize.txt  "src.rgb sw sh out.rgb dw dh": Image.resize((dw, dh), BICUBIC) of random RGB sources;
  preprocess.txt  "file alpha min max fetch_min fetch_max variant t h w n_floats fnv1a64": the Qwen2-VL slow
            processor computed with numpy as transformers does (float64 rescale then float32, float32
            normalize, reshape/transpose of _preprocess), hashed with FNV-1a 64 over the little-endian floats.
Nothing here imports caprl; the C tests compare against these files.
"""
import os
import random
import struct
import sys
import zlib

import numpy as np
from PIL import Image

# ---- a small PNG encoder (PNG spec, sections 7-9, 11) -------------------------------------------------------

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def pack_row(samples, depth):
    """samples: flat list of ints for one row -> bytes (MSB-first packing below 8 bits, big-endian at 16)."""
    if depth == 8:
        return bytes(samples)
    if depth == 16:
        return b"".join(struct.pack(">H", s) for s in samples)
    out, acc, nbits = bytearray(), 0, 0
    for s in samples:
        acc = (acc << depth) | s
        nbits += depth
        if nbits == 8:
            out.append(acc)
            acc, nbits = 0, 0
    if nbits:
        out.append(acc << (8 - nbits))
    return bytes(out)


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_rows(rows, bpp, first_filter):
    """Applies filter (first_filter + y) % 5 to row y, so every filter type appears."""
    out, prev = bytearray(), bytes(len(rows[0])) if rows else b""
    for y, row in enumerate(rows):
        ft = (first_filter + y) % 5
        f = bytearray()
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, paeth(a, b, c)][ft]
            f.append((x - pred) & 0xFF)
        out.append(ft)
        out += f
        prev = row
    return bytes(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png(path, width, height, color, depth, pixels, palette=None, trns=None, interlace=False):
    """pixels[y][x] = tuple of samples (length CHANNELS[color])."""
    ch = CHANNELS[color]
    bpp = max(1, ch * depth // 8)
    if interlace:
        raw = b""
        for p, (x0, y0, dx, dy) in enumerate(ADAM7):
            xs, ys = range(x0, width, dx), range(y0, height, dy)
            if not xs or not ys:
                continue
            rows = [pack_row([s for x in xs for s in pixels[y][x]], depth) for y in ys]
            raw += filter_rows(rows, bpp, p)
    else:
        rows = [pack_row([s for x in range(width) for s in pixels[y][x]], depth) for y in range(height)]
        raw = filter_rows(rows, bpp, 0)
    data = b"\x89PNG\r\n\x1a\n"
    data += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 1 if interlace else 0))
    if palette is not None:
        data += chunk(b"PLTE", bytes(v for rgb in palette for v in rgb))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    z = zlib.compress(raw, 9)
    # two IDAT chunks, to exercise the chunk boundary
    data += chunk(b"IDAT", z[: len(z) // 2]) + chunk(b"IDAT", z[len(z) // 2 :])
    data += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


# ---- fixture content --------------------------------------------------------------------------------------


def make_pngs(out, rng):
    W, H = 23, 17
    maxv = lambda d: (1 << d) - 1

    def grid(fn):
        return [[fn(x, y) for x in range(W)] for y in range(H)]

    def noise(d):
        return rng.randrange(0, maxv(d) + 1)

    files = []
    write_png(f"{out}/rgb8.png", W, H, 2, 8, grid(lambda x, y: (x * 11 % 256, y * 15 % 256, noise(8))))
    files.append("rgb8.png")
    # alpha covers 0, 255 and values in between; colours random
    alphas = [0, 255, 1, 254, 128, 127, 64, 200]
    write_png(f"{out}/rgba8.png", W, H, 6, 8,
              grid(lambda x, y: (noise(8), noise(8), noise(8), alphas[(x + y) % 8] if x % 3 else noise(8))))
    files.append("rgba8.png")
    # 16-bit: low bytes chosen so that truncation and rounding differ (0x12ff -> 0x12 vs 0x13)
    write_png(f"{out}/rgb16.png", W, H, 2, 16,
              grid(lambda x, y: ((x * 2749 + y * 97) % 65536, 0x12FF + 256 * ((x + y) % 200), noise(16))))
    files.append("rgb16.png")
    write_png(f"{out}/rgba16.png", W, H, 6, 16,
              grid(lambda x, y: (noise(16), 0x80FF, noise(16), (x * 3000 + y * 1000) % 65536)))
    files.append("rgba16.png")
    for d in (1, 2, 4, 8):
        write_png(f"{out}/gray{d}.png", W, H, 0, d, grid(lambda x, y: (noise(d),)))
        files.append(f"gray{d}.png")
    # 16-bit gray: many values below 256 (Pillow keeps them) and above (clipped to 255)
    write_png(f"{out}/gray16.png", W, H, 0, 16,
              grid(lambda x, y: ((x * 13 + y) if (x + y) % 2 else noise(16),)))
    files.append("gray16.png")
    write_png(f"{out}/graya8.png", W, H, 4, 8, grid(lambda x, y: (noise(8), alphas[(x * y) % 8])))
    files.append("graya8.png")
    write_png(f"{out}/graya16.png", W, H, 4, 16, grid(lambda x, y: (noise(16), (x * 2900 + y * 77) % 65536)))
    files.append("graya16.png")
    # palette 8-bit with tRNS on some entries
    pal = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(40)]
    write_png(f"{out}/pal8_trns.png", W, H, 3, 8, grid(lambda x, y: (rng.randrange(40),)), palette=pal,
              trns=bytes([0, 128, 255, 7]))
    files.append("pal8_trns.png")
    pal4 = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(16)]
    write_png(f"{out}/pal4.png", W, H, 3, 4, grid(lambda x, y: (rng.randrange(16),)), palette=pal4)
    files.append("pal4.png")
    # indices past a 6-entry palette: Pillow's palette is the gray ramp there
    write_png(f"{out}/pal_short.png", W, H, 3, 8, grid(lambda x, y: ((x * 7 + y) % 20,)), palette=pal[:6])
    files.append("pal_short.png")
    # RGB with tRNS (Pillow ignores it in convert("RGB"))
    write_png(f"{out}/rgb_trns.png", W, H, 2, 8, grid(lambda x, y: (x * 10, y * 10, 7)),
              trns=struct.pack(">HHH", 0, 0, 7))
    files.append("rgb_trns.png")
    # Adam7: odd sizes make some passes empty in one dimension
    write_png(f"{out}/interlaced_rgb.png", W, H, 2, 8, grid(lambda x, y: (noise(8), x * 9, y * 13)), interlace=True)
    files.append("interlaced_rgb.png")
    write_png(f"{out}/interlaced_rgba16.png", 5, 3, 6, 16, [[(noise(16), noise(16), noise(16), noise(16))
                                                             for x in range(5)] for y in range(3)], interlace=True)
    files.append("interlaced_rgba16.png")
    write_png(f"{out}/interlaced_gray2.png", 9, 11, 0, 2, [[(noise(2),) for x in range(9)] for y in range(11)],
              interlace=True)
    files.append("interlaced_gray2.png")
    # low-depth gray with tRNS: libpng must not turn the tRNS into alpha (Pillow keeps mode L)
    write_png(f"{out}/gray4_trns.png", 9, 11, 0, 4, [[(noise(4),) for x in range(9)] for y in range(11)],
              trns=struct.pack(">H", 5))
    files.append("gray4_trns.png")
    write_png(f"{out}/px1.png", 1, 1, 6, 8, [[(10, 20, 30, 40)]])
    files.append("px1.png")
    return files


def smooth_image(rng, w, h):
    """A photo-like image (smooth gradients + mild noise): JPEG and lossy WebP need something natural."""
    a = np.zeros((h, w, 3), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    a[..., 0] = 128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    a[..., 1] = 255 * xx / max(1, w - 1)
    a[..., 2] = 255 * yy / max(1, h - 1)
    a += np.array([[rng.uniform(-12, 12) for _ in range(w)] for _ in range(h)])[..., None]
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def make_jpegs_webps(out, rng):
    files = []
    img = Image.fromarray(smooth_image(rng, 45, 31), "RGB")
    img.save(f"{out}/baseline.jpg", quality=90)
    img.save(f"{out}/progressive.jpg", quality=85, progressive=True)
    img.save(f"{out}/q444.jpg", quality=95, subsampling=0)
    img.convert("L").save(f"{out}/gray.jpg", quality=90)
    # Pillow writes CMYK JPEG with an Adobe marker and inverted channels (rawmode "CMYK;I")
    cmyk = Image.fromarray(np.dstack([smooth_image(rng, 45, 31), smooth_image(rng, 45, 31)[..., :1]]), "CMYK")
    cmyk.save(f"{out}/cmyk.jpg", quality=90)
    files += ["baseline.jpg", "progressive.jpg", "q444.jpg", "gray.jpg", "cmyk.jpg"]
    img.save(f"{out}/lossy.webp", quality=80)
    rgba = np.dstack([smooth_image(rng, 45, 31), (np.arange(45 * 31).reshape(31, 45) * 7 % 256).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(f"{out}/lossless_alpha.webp", lossless=True)
    Image.fromarray(rgba, "RGBA").save(f"{out}/lossy_alpha.webp", quality=80)
    frames = [Image.fromarray(smooth_image(rng, 20, 14), "RGB") for _ in range(2)]
    frames[0].save(f"{out}/animated.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    files += ["lossy.webp", "lossless_alpha.webp", "lossy_alpha.webp", "animated.webp"]
    return files


def to_rgb_qwen_vl_utils(im):
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[3])
        return bg
    return im.convert("RGB")


# ---- the HF Qwen2-VL slow processor in numpy (transformers image_processing_qwen2_vl.py, v4.50) -------------

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def smart_resize(h, w, factor, min_pixels, max_pixels, utils):
    import math
    if not utils and (h < factor or w < factor):
        raise ValueError("too small")
    if max(h, w) / min(h, w) > 200:
        raise ValueError("ratio")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if utils:
        hb, wb = max(factor, hb), max(factor, wb)
    if hb * wb > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def hf_process(pil_rgb, min_pixels, max_pixels, fetch=None):
    if fetch is not None:  # qwen-vl-utils fetch_image resize first
        h, w = smart_resize(pil_rgb.height, pil_rgb.width, 28, fetch[0], fetch[1], True)
        pil_rgb = pil_rgb.resize((w, h), Image.Resampling.BICUBIC)
    image = np.array(pil_rgb)
    h, w = smart_resize(image.shape[0], image.shape[1], 28, min_pixels, max_pixels, False)
    image = np.array(Image.fromarray(image).resize((w, h), resample=Image.Resampling.BICUBIC))
    image = (image.astype(np.float64) * 0.00392156862745098).astype(np.float32)
    image = (image - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    image = image.transpose(2, 0, 1)
    patches = np.array([image])
    patches = np.tile(patches, (2, 1, 1, 1))
    c, t, p, m = 3, 2, 14, 2
    gt, gh, gw = patches.shape[0] // t, h // p, w // p
    patches = patches.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gt * gh * gw, c * t * p * p)
    return flat.astype("<f4"), (gt, gh, gw)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/img"
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20250917)
    files = make_pngs(out, rng) + make_jpegs_webps(out, rng)

    with open(f"{out}/decode.txt", "w") as man:
        man.write("# file mode width height golden_drop golden_white  (scripts/dump_pixels.py)\n")
        for f in files:
            im = Image.open(f"{out}/{f}")
            mode = im.mode
            drop = im.convert("RGB").tobytes()
            white = to_rgb_qwen_vl_utils(im).tobytes()
            base = os.path.splitext(f)[0] + "_" + os.path.splitext(f)[1][1:]
            with open(f"{out}/{base}.rgb", "wb") as g:
                g.write(drop)
            wname = "-"
            if white != drop:
                wname = f"{base}.white.rgb"
                with open(f"{out}/{wname}", "wb") as g:
                    g.write(white)
            man.write(f"{f} {mode} {im.width} {im.height} {base}.rgb {wname}\n")

    # Resize goldens: random sources, up- and downscales, odd factors, one-axis changes.
    cases = [((37, 23), [(56, 28), (13, 7), (37, 50), (61, 40), (28, 28), (5, 23), (1, 1), (74, 23)]),
             ((5, 7), [(3, 11), (28, 28), (1, 40)]),
             ((1, 1), [(28, 56), (3, 2)]),
             ((97, 61), [(28, 56), (14, 9), (96, 60), (300, 7)])]
    with open(f"{out}/resize.txt", "w") as man:
        man.write("# src.rgb sw sh out.rgb dw dh  (Pillow Image.resize BICUBIC)\n")
        for (sw, sh), outs in cases:
            src = bytes(rng.randrange(256) for _ in range(sw * sh * 3))
            sname = f"rs_src_{sw}x{sh}.rgb"
            with open(f"{out}/{sname}", "wb") as g:
                g.write(src)
            im = Image.frombytes("RGB", (sw, sh), src)
            for dw, dh in outs:
                oname = f"rs_{sw}x{sh}_to_{dw}x{dh}.rgb"
                with open(f"{out}/{oname}", "wb") as g:
                    g.write(im.resize((dw, dh), Image.Resampling.BICUBIC).tobytes())
                man.write(f"{sname} {sw} {sh} {oname} {dw} {dh}\n")

    # Preprocess goldens: (file, alpha rule, processor bounds, qwen-vl-utils bounds or None)
    pcases = [("rgba8.png", "white", 3136, 12845056, (3136, 12845056)),
              ("lossless_alpha.webp", "drop", 3136, 12845056, None),
              ("baseline.jpg", "white", 3136, 12845056, (3136, 12845056)),
              ("lossless_alpha.webp", "white", 3136, 12845056, (3136, 12845056)),
              ("rgb8.png", "white", 3136, 1003520, (6272, 12845056)),
              ("gray16.png", "drop", 3136, 3136, (3136, 12845056))]
    with open(f"{out}/preprocess.txt", "w") as man:
        man.write("# file alpha min max fetch_min fetch_max variant t h w n_floats fnv1a64"
                  "  (numpy, HF slow processor)\n")
        for f, alpha, mn, mx, fetch in pcases:
            im = Image.open(f"{out}/{f}")
            rgb = to_rgb_qwen_vl_utils(im) if alpha == "white" else im.convert("RGB")
            flat, (t, gh, gw) = hf_process(rgb, mn, mx, fetch)
            data = flat.tobytes()
            fm, fx = fetch if fetch else (0, 0)
            var = "qwen-vl-utils" if fetch else "hf"
            man.write(f"{f} {alpha} {mn} {mx} {fm} {fx} {var} {t} {gh} {gw} {flat.size} {fnv1a64(data):016x}\n")


if __name__ == "__main__":
    main()
