// Restores frames of any size through a nafnet-edge artifact of fixed tile size, on Android or any JVM.
//
// It pads, tiles, runs and blends exactly as nafnet-edge validated the artifact (the Python tiler, and the plan
// `nafnet-edge plan ARTIFACT --frame HxW --json` prints): zero padding on the right and bottom to a multiple of
// the padding multiple and at least to the tile; evenly spread tile starts aligned to that multiple; a separable
// raised-cosine blend whose outer quarter of each overlap is zero, normalised to sum to one. The tile values are
// read from the artifact's manifest.json (io.inputs[0].shape, tiling.overlap_px, tiling.align_px).
//
// Two paths, one per kind of artifact; the runtime call is behind an interface, so this file needs nothing but
// the Kotlin standard library (and java.nio). With ExecuTorch on Android (org.pytorch.executorch):
//
// Tensor I/O (float32 NCHW in [0, 1]): NafnetTiler and TileModule.
//
//     val module = Module.load(path)
//     val tiler = NafnetTiler(object : TileModule {
//         override fun run(input: FloatArray, channels: Int, height: Int, width: Int): FloatArray {
//             val x = Tensor.fromBlob(input, longArrayOf(1, channels.toLong(), height.toLong(), width.toLong()))
//             return module.forward(EValue.from(x))[0].toTensor().dataAsFloatArray
//         }
//     }, tileHeight = 256, tileWidth = 256, overlap = 32, align = 16)
//     val pixels = IntArray(bitmap.width * bitmap.height)
//     bitmap.getPixels(pixels, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height)
//     val restored = tiler.restoreArgb(pixels, bitmap.height, bitmap.width)
//     val out = Bitmap.createBitmap(restored, bitmap.width, bitmap.height, Bitmap.Config.ARGB_8888)
//
// Image I/O (uint8 [1, H, W, P] pixels in the artifact's pixel format, io.pixel_format; the default rgba is the
// byte order of an ARGB_8888 Bitmap's copyPixelsToBuffer): NafnetPixelTiler and PixelTileModule.
//
//     val module = Module.load(path)
//     val tiler = NafnetPixelTiler(object : PixelTileModule {
//         override fun run(pixels: ByteArray, height: Int, width: Int): ByteArray {
//             val x = Tensor.fromBlobUnsigned(pixels, longArrayOf(1, height.toLong(), width.toLong(), 4))
//             return module.forward(EValue.from(x))[0].toTensor().dataAsUnsignedByteArray
//         }
//     }, tileHeight = 256, tileWidth = 256, overlap = 32, align = 16, bytesPerPixel = 4)
//     val bytes = ByteBuffer.allocate(bitmap.byteCount)  // ARGB_8888: RGBA bytes, width * 4 per row
//     bitmap.copyPixelsToBuffer(bytes)
//     val out = Bitmap.createBitmap(bitmap.width, bitmap.height, Bitmap.Config.ARGB_8888)
//     out.copyPixelsFromBuffer(tiler.restoreBuffer(bytes, bitmap.height, bitmap.width))  // opaque: alpha 255
//
// A Bitmap's bytes are alpha-premultiplied: camera frames and decoded photos are opaque, where that changes nothing.

package nafnetedge

import kotlin.math.ceil
import kotlin.math.cos
import kotlin.math.max
import kotlin.math.min
import kotlin.math.round // ties to even, as Python's round and numpy's rint
import java.nio.ByteBuffer

/** One forward pass of the artifact: [input] is NCHW float32 of shape [1, channels, height, width] in [0, 1];
 *  returns the restored tile, same shape, unclamped. */
interface TileModule {
    fun run(input: FloatArray, channels: Int, height: Int, width: Int): FloatArray
}

/** Where the tiles of a [frameHeight] x [frameWidth] frame go and how they are weighted (row-major tiles). Tiles
 *  are cut in input pixels; a super-resolution model's outputs ([scale] times larger) are blended with the weights
 *  in output pixels: [weightsY] and [weightsX] have [scale] x [tileHeight] and [scale] x [tileWidth] entries. */
class TilePlan(
    val frameHeight: Int,
    val frameWidth: Int,
    val tileHeight: Int,
    val tileWidth: Int,
    val overlap: Int,
    val align: Int,
    val scale: Int = 1
) {
    val paddedHeight = max(tileHeight, roundUp(frameHeight, align))
    val paddedWidth = max(tileWidth, roundUp(frameWidth, align))
    val ys: IntArray = tileStarts(paddedHeight, tileHeight, overlap, align)
    val xs: IntArray = tileStarts(paddedWidth, tileWidth, overlap, align)
    val weightsY: Array<FloatArray> = axisWeights(paddedHeight * scale, tileHeight * scale, scaled(ys))
    val weightsX: Array<FloatArray> = axisWeights(paddedWidth * scale, tileWidth * scale, scaled(xs))

    private fun scaled(starts: IntArray) = IntArray(starts.size) { starts[it] * scale }

    init {
        require(scale > 0) { "scale must be positive" }
        require(tileHeight > 0 && tileWidth > 0) { "tile size must be positive" }
        require(overlap >= 0 && overlap < min(tileHeight, tileWidth)) { "overlap must be in [0, tile size)" }
        require(frameHeight > 0 && frameWidth > 0) { "frame size must be positive" }
    }

    companion object {
        private fun roundUp(n: Int, multiple: Int) = (n + multiple - 1) / multiple * multiple

        /** Tile starts covering [0, length): evenly spread, overlapping by at least [overlap], multiples of
         *  [align] where tile and length allow it. */
        fun tileStarts(length: Int, tile: Int, overlap: Int, align: Int): IntArray {
            if (tile >= length) return intArrayOf(0)
            val step = tile - overlap
            val a = if (tile % align != 0 || length % align != 0 || step < align) 1 else align
            var n = ceil((length - tile).toDouble() / step).toInt() + 1
            while (true) {
                val starts = IntArray(n) { i -> a * round(i * (length - tile).toDouble() / (n - 1) / a).toInt() }
                if ((1 until n).all { starts[it] - starts[it - 1] <= step }) return starts
                n += 1
            }
        }

        private fun rise(overlap: Int): DoubleArray {
            val margin = overlap / 4
            val n = overlap - 2 * margin
            return DoubleArray(overlap) { i ->
                when {
                    i < margin -> 0.0
                    i < overlap - margin -> 0.5 - 0.5 * cos(Math.PI * (i - margin + 0.5) / n)
                    else -> 1.0
                }
            }
        }

        /** Per-tile weights along one axis, summing to one at every position. */
        fun axisWeights(length: Int, tile: Int, starts: IntArray): Array<FloatArray> {
            val raw = starts.indices.map { k ->
                val w = DoubleArray(tile) { 1.0 }
                if (k > 0) {
                    val r = starts[k - 1] + tile - starts[k]
                    val up = rise(r)
                    for (i in 0 until r) w[i] = up[i]
                }
                if (k < starts.size - 1) {
                    val r = starts[k] + tile - starts[k + 1]
                    val up = rise(r)
                    for (i in 0 until r) w[tile - r + i] = min(w[tile - r + i], up[r - 1 - i])
                }
                w
            }
            val total = DoubleArray(length)
            for ((k, s) in starts.withIndex()) for (i in 0 until tile) total[s + i] += raw[k][i]
            return Array(starts.size) { k -> FloatArray(tile) { i -> (raw[k][i] / total[starts[k] + i]).toFloat() } }
        }
    }
}

/** Restores whole frames through [module], one [tileHeight] x [tileWidth] tile at a time; a super-resolution
 *  artifact returns tiles [scale] times larger (the manifest's `io.scale`) and the frame comes back that much
 *  larger. */
class NafnetTiler(
    private val module: TileModule,
    val tileHeight: Int,
    val tileWidth: Int,
    val overlap: Int,
    val align: Int,
    val channels: Int = 3,
    val scale: Int = 1
) {
    fun plan(height: Int, width: Int) = TilePlan(height, width, tileHeight, tileWidth, overlap, align, scale)

    /** [frame]: HWC float32 in [0, 1] of [height] x [width] x [channels]; returns the restored frame, HWC,
     *  [scale] x [height] by [scale] x [width], unclamped (clamp to [0, 1] before converting to 8 bits). */
    fun restore(frame: FloatArray, height: Int, width: Int): FloatArray {
        require(frame.size == height * width * channels) { "frame has ${frame.size} values, not $height x $width x $channels" }
        val p = plan(height, width)
        val th = tileHeight
        val tw = tileWidth
        val s = scale
        val outWidth = width * s
        val out = FloatArray(height * s * outWidth * channels)
        val input = FloatArray(channels * th * tw)
        for ((row, y0) in p.ys.withIndex()) {
            for ((col, x0) in p.xs.withIndex()) {
                input.fill(0f) // the frame's zero padding, where the tile reaches past it
                for (c in 0 until channels) for (i in 0 until th) for (j in 0 until tw) {
                    val y = y0 + i
                    val x = x0 + j
                    if (y < height && x < width) input[(c * th + i) * tw + j] = frame[(y * width + x) * channels + c]
                }
                val result = module.run(input, channels, th, tw)
                val expected = input.size * s * s
                require(result.size == expected) { "the module returned ${result.size} values, not $expected" }
                val wy = p.weightsY[row]
                val wx = p.weightsX[col]
                for (i in 0 until min(th, height - y0) * s) for (j in 0 until min(tw, width - x0) * s) {
                    val weight = wy[i] * wx[j]
                    val o = ((y0 * s + i) * outWidth + x0 * s + j) * channels
                    for (c in 0 until channels) out[o + c] += result[(c * th * s + i) * tw * s + j] * weight
                }
            }
        }
        return out
    }

    /** [pixels]: ARGB_8888 as Bitmap.getPixels returns them (alpha ignored); returns opaque ARGB_8888 ([scale]
     *  times the height and width), each channel clamped to [0, 1] and rounded to 8 bits. RGB models only. */
    fun restoreArgb(pixels: IntArray, height: Int, width: Int): IntArray {
        require(channels == 3) { "ARGB pixels need a 3-channel (RGB) model" }
        require(pixels.size == height * width) { "${pixels.size} pixels, not $height x $width" }
        val frame = FloatArray(height * width * 3)
        for (k in pixels.indices) {
            val argb = pixels[k]
            frame[3 * k] = ((argb shr 16) and 0xFF) / 255f
            frame[3 * k + 1] = ((argb shr 8) and 0xFF) / 255f
            frame[3 * k + 2] = (argb and 0xFF) / 255f
        }
        val restored = restore(frame, height, width)
        fun level(v: Float) = (min(max(v, 0f), 1f) * 255f + 0.5f).toInt()
        return IntArray(height * width * scale * scale) { k ->
            (0xFF shl 24) or (level(restored[3 * k]) shl 16) or (level(restored[3 * k + 1]) shl 8) or level(restored[3 * k + 2])
        }
    }
}

/** One forward pass of an image-I/O artifact: [pixels] is one tile, uint8 [1, height, width, P] interleaved row by
 *  row in the artifact's pixel format (P bytes a pixel); returns the restored tile, same layout. */
interface PixelTileModule {
    fun run(pixels: ByteArray, height: Int, width: Int): ByteArray
}

/** Restores whole frames of 8-bit pixels through an image-I/O artifact ([module]), one [tileHeight] x [tileWidth]
 *  tile at a time, [bytesPerPixel] bytes a pixel (4: rgba/bgra, 3: rgb/bgr, 1: gray).
 *
 *  The result is byte for byte what the Python in the artifact's USAGE.md computes: each tile's output bytes
 *  times the weight wy[row][i] * wx[col][j] (the float32 plan weights multiplied in double precision, as numpy's
 *  outer product of them is), added tile by tile in row-major order into a float32 sum, then rounded half to
 *  even and clamped to 0..255. */
class NafnetPixelTiler(
    private val module: PixelTileModule,
    val tileHeight: Int,
    val tileWidth: Int,
    val overlap: Int,
    val align: Int,
    val bytesPerPixel: Int = 4,
    val scale: Int = 1
) {
    init {
        require(bytesPerPixel > 0) { "bytesPerPixel must be positive" }
    }

    fun plan(height: Int, width: Int) = TilePlan(height, width, tileHeight, tileWidth, overlap, align, scale)

    /** [frame]: [height] x [width] pixels, [bytesPerPixel] interleaved bytes each, row by row; returns the
     *  restored frame, same layout, [scale] times the height and width (a super-resolution artifact's tiles come
     *  back that much larger). With 4 bytes a pixel the last (alpha) byte is ignored in and 255 out, as the
     *  artifact does; the zero padding reaches the artifact with alpha 0, which it ignores too. */
    fun restore(frame: ByteArray, height: Int, width: Int): ByteArray {
        val bpp = bytesPerPixel
        require(frame.size == height * width * bpp) { "frame has ${frame.size} bytes, not $height x $width x $bpp" }
        val p = plan(height, width)
        val th = tileHeight
        val tw = tileWidth
        val s = scale
        val outWidth = width * s
        val sum = FloatArray(height * s * outWidth * bpp)
        val tile = ByteArray(th * tw * bpp)
        for ((row, y0) in p.ys.withIndex()) {
            for ((col, x0) in p.xs.withIndex()) {
                val rows = max(0, min(th, height - y0)) // the part of the tile inside the frame
                val cols = max(0, min(tw, width - x0))
                tile.fill(0) // the frame's zero padding, where the tile reaches past it
                for (i in 0 until rows) {
                    System.arraycopy(frame, ((y0 + i) * width + x0) * bpp, tile, i * tw * bpp, cols * bpp)
                }
                val result = module.run(tile, th, tw)
                val expected = tile.size * s * s
                require(result.size == expected) { "the module returned ${result.size} bytes, not $expected" }
                val wy = p.weightsY[row]
                val wx = p.weightsX[col]
                for (i in 0 until rows * s) {
                    val wyi = wy[i].toDouble()
                    for (j in 0 until cols * s) {
                        val weight = wyi * wx[j].toDouble() // exact: two float32 values
                        val o = ((y0 * s + i) * outWidth + x0 * s + j) * bpp
                        val t = (i * tw * s + j) * bpp
                        // numpy: uint8 * float64 in double, then float32 += float64 in double, stored as float32
                        for (c in 0 until bpp) {
                            sum[o + c] = (sum[o + c] + (result[t + c].toInt() and 0xFF) * weight).toFloat()
                        }
                    }
                }
            }
        }
        val alpha = if (bpp == 4) 3 else -1
        return ByteArray(sum.size) { k ->
            if (k % bpp == alpha) 255.toByte() else min(max(round(sum[k]), 0f), 255f).toInt().toByte()
        }
    }

    /** A Bitmap's bytes: [pixels] holds exactly [height] x [width] pixels from index 0 (what
     *  `bitmap.copyPixelsToBuffer` writes into a buffer of `bitmap.byteCount` bytes; its position is not used or
     *  moved); returns a new buffer of the restored bytes at position 0, ready for `bitmap.copyPixelsFromBuffer`. */
    fun restoreBuffer(pixels: ByteBuffer, height: Int, width: Int): ByteBuffer {
        val n = height * width * bytesPerPixel
        require(pixels.limit() == n) {
            "the buffer holds ${pixels.limit()} bytes, not $height x $width x $bytesPerPixel: copy a Bitmap whose " +
                "rows are padded (rowBytes != width * $bytesPerPixel) row by row"
        }
        val frame = ByteArray(n)
        pixels.duplicate().apply { rewind() }.get(frame)
        return ByteBuffer.wrap(restore(frame, height, width))
    }
}
