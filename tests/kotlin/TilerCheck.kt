// Drives nafnet_edge/android/NafnetTiler.kt for tests/test_android_tiler.py (compiled with it by kotlinc).
import nafnetedge.NafnetPixelTiler
import nafnetedge.NafnetTiler
import nafnetedge.PixelTileModule
import nafnetedge.TileModule
import nafnetedge.TilePlan
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import kotlin.math.abs
import kotlin.math.max

fun readFloats(file: File): FloatArray {
    val buffer = ByteBuffer.wrap(file.readBytes()).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
    return FloatArray(buffer.remaining()).also { buffer.get(it) }
}

fun writeFloats(file: File, values: FloatArray) {
    val buffer = ByteBuffer.allocate(4 * values.size).order(ByteOrder.LITTLE_ENDIAN)
    buffer.asFloatBuffer().put(values)
    file.writeBytes(buffer.array())
}

fun bits(values: FloatArray) = values.joinToString(" ") { java.lang.Float.floatToRawIntBits(it).toString() }

fun main(args: Array<String>) {
    val n = args.drop(1).filter { it.all(Char::isDigit) }.map(String::toInt)
    when (args[0]) {
        "plan" -> {
            val (h, w, th, tw) = n
            val plan = TilePlan(h, w, th, tw, n[4], n[5], n.getOrElse(6) { 1 })
            println("padded ${plan.paddedHeight} ${plan.paddedWidth}")
            println("ys ${plan.ys.joinToString(" ")}")
            println("xs ${plan.xs.joinToString(" ")}")
            plan.weightsY.forEachIndexed { k, wy -> println("wy $k ${bits(wy)}") }
            plan.weightsX.forEachIndexed { k, wx -> println("wx $k ${bits(wx)}") }
        }
        "identity" -> {
            val (h, w, c, t) = n
            var seed = 12345L
            val frame = FloatArray(h * w * c) {
                seed = (seed * 6364136223846793005L + 1442695040888963407L)
                ((seed ushr 40) % 1000).toFloat() / 999f
            }
            val same = object : TileModule {
                override fun run(input: FloatArray, channels: Int, height: Int, width: Int) = input.copyOf()
            }
            val out = NafnetTiler(same, t, t, n[4], n[5], c).restore(frame, h, w)
            println("max_abs_diff ${frame.indices.map { abs(frame[it] - out[it]) }.max()}")
            if (c == 3) {
                val argb = IntArray(h * w) { k -> (k * 2654435761L).toInt() or (0xFF shl 24) }
                val back = NafnetTiler(same, t, t, n[4], n[5], 3).restoreArgb(argb, h, w)
                println("argb_mismatches ${argb.indices.count { argb[it] != back[it] }}")
            }
        }
        "replay" -> {
            val dir = File(args[1])
            val (h, w, c, t) = n
            val frame = readFloats(File(dir, "frame.f32"))
            val inputs = readFloats(File(dir, "inputs.f32"))
            val outputs = readFloats(File(dir, "outputs.f32"))
            val scale = n.getOrElse(6) { 1 }
            val size = c * t * t
            val outSize = size * scale * scale
            var calls = 0
            var inputDiff = 0f
            val replay = object : TileModule {
                override fun run(input: FloatArray, channels: Int, height: Int, width: Int): FloatArray {
                    for (i in input.indices) inputDiff = max(inputDiff, abs(input[i] - inputs[calls * size + i]))
                    return outputs.copyOfRange(calls * outSize, (++calls) * outSize)
                }
            }
            val tiler = NafnetTiler(replay, t, t, n[4], n[5], c, scale)
            writeFloats(File(dir, "out.f32"), tiler.restore(frame, h, w))
            println("calls $calls")
            println("input_max_abs_diff $inputDiff")
        }
        "pixel-identity" -> {
            val (h, w, bpp, t) = n
            var seed = 12345L
            val frame = ByteArray(h * w * bpp) {
                seed = (seed * 6364136223846793005L + 1442695040888963407L)
                (seed ushr 56).toByte()
            }
            var calls = 0
            val same = object : PixelTileModule {
                override fun run(pixels: ByteArray, height: Int, width: Int): ByteArray {
                    calls++
                    return pixels.copyOf()
                }
            }
            val tiler = NafnetPixelTiler(same, t, t, n[4], n[5], bpp)
            val out = tiler.restore(frame, h, w)
            val expected = ByteArray(frame.size) { k -> if (bpp == 4 && k % 4 == 3) -1 else frame[k] } // alpha 255
            println("calls $calls")
            println("mismatches ${frame.indices.count { out[it] != expected[it] }}")
            println("opaque_in ${(3 until frame.size step 4).count { bpp == 4 && frame[it] == (-1).toByte() }}")
            val buffer = ByteBuffer.allocate(frame.size).put(frame) // as copyPixelsToBuffer leaves it: at the end
            val back = tiler.restoreBuffer(buffer, h, w)
            println("buffer_position ${buffer.position()} ${back.position()} ${back.remaining()}")
            println("buffer_mismatches ${out.indices.count { out[it] != back.get(it) }}")
        }
        "pixel-upsample" -> {
            val (h, w, bpp, t) = n
            val scale = n[6]
            var seed = 12345L
            val frame = ByteArray(h * w * bpp) {
                seed = (seed * 6364136223846793005L + 1442695040888963407L)
                (seed ushr 56).toByte()
            }
            val nearest = object : PixelTileModule { // a x[scale] "super-resolution" artifact: each pixel repeated
                override fun run(pixels: ByteArray, height: Int, width: Int): ByteArray =
                    ByteArray(pixels.size * scale * scale) { k ->
                        val pixel = k / bpp
                        val y = pixel / (width * scale) / scale
                        val x = pixel % (width * scale) / scale
                        pixels[(y * width + x) * bpp + k % bpp]
                    }
            }
            val out = NafnetPixelTiler(nearest, t, t, n[4], n[5], bpp, scale).restore(frame, h, w)
            var mismatches = 0
            for (k in out.indices) {
                val pixel = k / bpp
                val y = pixel / (w * scale) / scale
                val x = pixel % (w * scale) / scale
                val want = if (bpp == 4 && k % 4 == 3) (-1).toByte() else frame[(y * w + x) * bpp + k % bpp]
                if (out[k] != want) mismatches++
            }
            println("size ${out.size}")
            println("mismatches $mismatches")
        }
        "pixel-replay" -> {
            val dir = File(args[1])
            val (h, w, bpp, t) = n
            val frame = File(dir, "frame.u8").readBytes()
            val inputs = File(dir, "inputs.u8").readBytes()
            val outputs = File(dir, "outputs.u8").readBytes()
            val size = t * t * bpp
            var calls = 0
            var inputMismatches = 0
            val replay = object : PixelTileModule {
                override fun run(pixels: ByteArray, height: Int, width: Int): ByteArray {
                    check(height == t && width == t && pixels.size == size)
                    for (i in pixels.indices) if (pixels[i] != inputs[calls * size + i]) inputMismatches++
                    return outputs.copyOfRange(calls * size, (++calls) * size)
                }
            }
            File(dir, "out.u8").writeBytes(NafnetPixelTiler(replay, t, t, n[4], n[5], bpp).restore(frame, h, w))
            println("calls $calls")
            println("input_mismatches $inputMismatches")
        }
        else -> error("unknown command ${args[0]}")
    }
}
